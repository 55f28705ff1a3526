"""The decoding core that `Generator` (launch.generate, chat, the lm-eval harness) and the
serving `Engine` (launch.serve) share: the model prepared for decoding, its KV cache, one
forward pass, one sampler, and the log-probabilities of chosen tokens.

Sampling follows transformers' and vLLM's order: divide by the temperature, keep the
top-k logits, then keep the smallest set of those whose renormalised probability
reaches top-p. Every parameter is an array with a value per row, so a row's draw
depends only on its logits, its own parameters and its own key, never on the other
rows: the same logits and seed give the same token through every path.

Keys: a row sampling with seed `s` starts from `jax.random.PRNGKey(s)` (`seed_keys`) and
draws its t-th new token with `fold_in(key, t)` (`step_keys`).
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from lmjax.errors import UserError
from lmjax.model import TransformerConfig, build_model, unstack_layers
from lmjax.objectives.losses import target_logprobs

Array = jax.Array
TOP_LOGPROBS = 5  # alternatives computed per token (OpenAI's limit for `logprobs`)


class Decoder:
  """A decoder model with `decode=True`, its parameters in the layout decoding reads."""

  def __init__(self, cfg: TransformerConfig, params: Any, refusal: str,
               wrap_model: Callable[[Any], Any] | None = None):
    """`wrap_model`: applied to the built model, e.g. LoRA's base + adapters."""
    if cfg.family != "decoder":
      raise UserError(refusal)
    cfg = cfg.replace(dropout_rate=0.0, remat_policy="none")
    self._stacked = cfg.scan_layers
    # Unrolled: a scanned decode step slices every layer's weights and cache out of the
    # stacked arrays and writes the cache back, several times the bytes a step must read.
    self.cfg = cfg.replace(scan_layers=False)
    self.params = self.layout(params)
    self.model = build_model(self.cfg, decode=True)
    if wrap_model is not None:
      self.model = wrap_model(self.model)

  def layout(self, params: Any) -> Any:
    """`params` of the model this decoder was built for, in the layout decoding reads: a
    scanned model's layers unstacked (one copy of them), an unrolled model's as they are."""
    return unstack_layers(params, self.cfg.num_layers) if self._stacked else params

  def init_cache(self, rows: int, length: int) -> Any:
    """An empty KV cache of `rows` rows, each `length` tokens long."""
    dummy = jnp.zeros((rows, length), jnp.int32)
    shapes = jax.eval_shape(lambda: self.model.apply({"params": self.params}, dummy,
                                                     mutable=["cache"])[1]["cache"])
    return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)

  def forward(self, params: Any, cache: Any, tokens: Array, segments: Array, positions: Array
              ) -> tuple[Array, Any]:
    """Appends (B, T) tokens (segment 0: padding, not attended to and not counted in the
    row's cache index) to the cache; float32 logits (B, T, V) and the new cache."""
    logits, out = self.model.apply({"params": params, "cache": cache}, tokens, segments,
                                   positions, mutable=["cache"])
    return logits.astype(jnp.float32), out["cache"]


def seed_keys(seeds: Sequence[int]) -> np.ndarray:
  """(S, 2) uint32 keys, row i equal to `jax.random.PRNGKey(seeds[i] mod 2**64)`, built on the
  host (no device round trip)."""
  seeds = [int(s) % 2 ** 64 for s in seeds]
  return np.array([((s >> 32) & 0xFFFFFFFF, s & 0xFFFFFFFF) for s in seeds],
                  np.uint32).reshape(len(seeds), 2)


def step_keys(keys: Array, counters: Array) -> Array:
  """(S, 2) row keys, (S,) tokens each row has drawn so far -> (S, 2) keys of this draw."""
  return jax.vmap(jax.random.fold_in)(keys, counters)


def sample(logits: Array, keys: Array, temperature: Array, top_p: Array, top_k: Array
           ) -> Array:
  """(S, V) logits, (S, 2) keys, (S,) temperature, top_p, top_k -> (S,) int32 token ids.

  Temperature 0 is greedy (the argmax of the raw logits); top_k 0 and top_p 1 keep every
  token. A row's draw is `jax.random.categorical(key, kept logits)`'s, written out (the
  argmax of Gumbel noise plus the logits) so that greedy and sampled rows share one argmax.
  Rows that filter nothing skip the sort, and a batch of greedy rows skips the random
  draw: both only save work, the tokens are the same."""
  greedy = temperature == 0
  unfiltered = (top_p >= 1) & (top_k <= 0)

  def draw(filtering: bool) -> Array:
    kept = logits / jnp.maximum(temperature, 1e-6)[:, None]
    if filtering:
      kept = jnp.where(unfiltered[:, None], kept, _top_k_top_p(kept, top_p, top_k))
    noise = jax.vmap(lambda key: jax.random.gumbel(key, logits.shape[1:], logits.dtype))(keys)
    return first_argmax(jnp.where(greedy[:, None], logits, noise + kept))
  branches = [lambda: first_argmax(logits), lambda: draw(False), lambda: draw(True)]
  which = jnp.where(jnp.all(greedy), 0, jnp.where(jnp.all(unfiltered), 1, 2))
  return jax.lax.switch(which, branches)


def first_argmax(x: Array) -> Array:
  """(S, V) -> (S,) int32: `jnp.argmax` (the first index of each row's maximum) as two plain
  reductions; XLA:CPU runs argmax's paired (value, index) reduction several times slower."""
  top = jnp.max(x, axis=-1, keepdims=True)
  vocab = x.shape[-1]
  first = jnp.min(jnp.where(x == top, jnp.arange(vocab, dtype=jnp.int32), vocab), axis=-1)
  return jnp.minimum(first, vocab - 1)  # a row of NaNs: the last id, not out of range


def _top_k_top_p(scaled: Array, top_p: Array, top_k: Array) -> Array:
  """(S, V) tempered logits with -inf outside each row's top-k, then outside the smallest
  set of the kept tokens whose renormalised probability reaches top_p (ties at either
  threshold are kept, as transformers keeps them)."""
  vocab = scaled.shape[-1]
  ordered = -jnp.sort(-scaled, axis=-1)  # (S, V) descending
  kth = jnp.take_along_axis(ordered, jnp.clip(top_k - 1, 0, vocab - 1)[:, None], axis=-1)
  kth = jnp.where(top_k[:, None] > 0, kth, -jnp.inf)  # (S, 1)
  in_top_k = ordered >= kth
  probs = jax.nn.softmax(jnp.where(in_top_k, ordered, -jnp.inf), axis=-1)
  before = jnp.cumsum(probs, axis=-1) - probs  # mass of the more likely kept tokens
  keep = in_top_k & ((before < top_p[:, None]) | (top_p[:, None] >= 1))
  cutoff = jnp.min(jnp.where(keep, ordered, jnp.inf), axis=-1, keepdims=True)  # (S, 1)
  return jnp.where(scaled < cutoff, -jnp.inf, scaled)


def token_logprobs(logits: Array, chosen: Array) -> tuple[Array, Array, Array]:
  """(N, V) logits, (N,) chosen ids -> their log-probabilities (N,) and the most likely
  alternatives: ids (N, TOP_LOGPROBS) and log-probabilities (N, TOP_LOGPROBS)."""
  logits = logits.astype(jnp.float32)
  top_logits, top_ids = jax.lax.top_k(logits, TOP_LOGPROBS)
  top_lp = top_logits - jax.nn.logsumexp(logits, axis=-1, keepdims=True)
  return target_logprobs(logits, chosen), top_ids, top_lp
