"""Incremental decoding for decoder models with a preallocated KV cache.

Prompts of different lengths are right-padded to one length P (padding has
segment id 0, so nothing attends to it, and each row's cache index advances by
its real tokens only, so its first new token overwrites its padding); the cache
holds P + max_new_tokens slots. `generate` prefills the prompts in one forward pass,
then produces one token per step inside `lax.while_loop`, all in one compiled
function. `stream` yields tokens one by one from the host for interactive use. The
cache, the forward pass and the sampler are `decoder.py`'s, shared with the serving
engine: row i of a batch sampled with `seed` draws as a served request with seed
`seed + i` does.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from lmjax.errors import UserError
from lmjax.inference.decoder import Decoder, sample, seed_keys, step_keys
from lmjax.model import TransformerConfig, build_model

Array = jax.Array
PROMPT_BUCKET = 16  # prompt lengths are rounded up to this, so few shapes get compiled


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
  max_new_tokens: int = 64
  temperature: float = 0.0  # 0 = greedy
  top_k: int = 0  # keep the k most likely tokens (0 = all)
  top_p: float = 1.0  # then the smallest set of those with this much probability

  def __post_init__(self):
    if self.max_new_tokens < 1 or self.temperature < 0 or self.top_k < 0:
      raise UserError("max_new_tokens must be >= 1; temperature and top_k must be >= 0")
    if not 0 < self.top_p <= 1:
      raise UserError(f"top_p must be in (0, 1], got {self.top_p}")

  def rows(self, seed: int, rows: int) -> tuple[np.ndarray, ...]:
    """The sampler's per-row arrays for `rows` rows: temperature, top_p, top_k (each (rows,))
    and keys (rows, 2), row i seeded with seed + i."""
    return (np.full(rows, self.temperature, np.float32), np.full(rows, self.top_p, np.float32),
            np.full(rows, self.top_k, np.int32), seed_keys([seed + i for i in range(rows)]))


def right_pad(prompts: Sequence[Sequence[int]], length: int, pad: int
              ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Prompts -> (tokens, segment_ids, positions), each (B, length), padded on the right."""
  tokens = np.full((len(prompts), length), pad, np.int32)
  segments = np.zeros_like(tokens)
  positions = np.zeros_like(tokens)
  for i, p in enumerate(prompts):
    tokens[i, :len(p)] = p
    segments[i, :len(p)] = 1
    positions[i, :len(p)] = np.arange(len(p))
  return tokens, segments, positions


class Generator:
  """Decoding with one decoder model's parameters; compiled functions are cached per shape."""

  def __init__(self, cfg: TransformerConfig, params: Any, eos: int, pad: int):
    self.decoder = Decoder(cfg, params, "generation needs a decoder (CLM) model; use fill_mask "
                           "for encoders")
    self.cfg, self.params, self.eos, self.pad = self.decoder.cfg, self.decoder.params, eos, pad
    self.full_model = build_model(self.cfg)

  def _forward(self, params, cache, tokens, segments, positions):
    """Appends (B, T) right-padded tokens to the cache; returns the logits at each row's last
    real token (B, V) and the cache."""
    logits, cache = self.decoder.forward(params, cache, tokens, segments, positions)
    last = jnp.maximum(jnp.sum(segments != 0, axis=1) - 1, 0)  # (B,)
    return jnp.take_along_axis(logits, last[:, None, None], axis=1)[:, 0], cache

  def _fit(self, prompts: Sequence[Sequence[int]], max_new: int) -> tuple[list, int]:
    """Keeps each prompt's newest tokens so that prompt + new tokens fit max_len."""
    room = self.cfg.max_len - max_new
    if room < 1:
      raise UserError(f"max_new_tokens={max_new} leaves no room for a prompt in "
                      f"max_len={self.cfg.max_len}")
    prompts = [list(p[-room:]) for p in prompts]
    if not all(prompts):
      raise UserError("empty prompt")
    longest = max(len(p) for p in prompts)
    return prompts, min(-(-longest // PROMPT_BUCKET) * PROMPT_BUCKET, room)

  @functools.partial(jax.jit, static_argnums=(0, 5))
  def _generate(self, params, tokens, segments, positions, n: int, knobs):
    """(B, n) new tokens, pad after a row's EOS; `knobs`: SamplingConfig.rows' arrays."""
    temperature, top_p, top_k, keys = knobs
    b, p = tokens.shape
    cache = self.decoder.init_cache(b, p + n)
    logits, cache = self._forward(params, cache, tokens, segments, positions)
    lengths = jnp.sum(segments, axis=1)  # (B,) real prompt tokens

    def body(carry):
      t, cache, logits, out, done = carry
      tok = sample(logits, step_keys(keys, jnp.full((b,), t)), temperature, top_p, top_k)
      tok = jnp.where(done, self.pad, tok)
      out = out.at[:, t].set(tok)
      logits, cache = self._forward(params, cache, tok[:, None], (~done)[:, None].astype(jnp.int32),
                                    (lengths + t)[:, None])
      return t + 1, cache, logits, out, done | (tok == self.eos)

    out = jnp.full((b, n), self.pad, jnp.int32)
    carry = (jnp.int32(0), cache, logits, out, jnp.zeros((b,), bool))
    carry = jax.lax.while_loop(lambda c: (c[0] < n) & ~jnp.all(c[4]), body, carry)
    return carry[3]

  def generate(self, prompts: Sequence[Sequence[int]], sampling: SamplingConfig,
               seed: int = 0) -> list[list[int]]:
    """New tokens for each prompt, up to and excluding EOS; row i samples with seed + i."""
    prompts, length = self._fit(prompts, sampling.max_new_tokens)
    arrays = right_pad(prompts, length, self.pad)
    out = np.asarray(self._generate(self.params, *arrays, sampling.max_new_tokens,
                                    sampling.rows(seed, len(prompts))))
    return [_until(row, self.eos) for row in out.tolist()]

  @functools.partial(jax.jit, static_argnums=(0,))
  def _prefill(self, params, tokens, segments, positions, cache):
    return self._forward(params, cache, tokens, segments, positions)

  @functools.partial(jax.jit, static_argnums=(0,))
  def _step(self, params, cache, logits, t, knobs, position):
    temperature, top_p, top_k, keys = knobs
    tok = sample(logits, step_keys(keys, t[None]), temperature, top_p, top_k)
    logits, cache = self._forward(params, cache, tok[:, None], jnp.ones((1, 1), jnp.int32),
                                  position[None, None])
    return tok[0], logits, cache

  def stream(self, prompt: Sequence[int], sampling: SamplingConfig, seed: int = 0
             ) -> Iterator[int]:
    """Yields new tokens of one prompt as they are produced, stopping at EOS."""
    (prompt,), length = self._fit([prompt], sampling.max_new_tokens)
    arrays = right_pad([prompt], length, self.pad)
    cache = self.decoder.init_cache(1, length + sampling.max_new_tokens)
    logits, cache = self._prefill(self.params, *arrays, cache)
    knobs = sampling.rows(seed, 1)
    for t in range(sampling.max_new_tokens):
      tok, logits, cache = self._step(self.params, cache, logits, np.int32(t), knobs,
                                      np.int32(len(prompt) + t))
      tok = int(tok)
      if tok == self.eos:
        return
      yield tok

  @functools.partial(jax.jit, static_argnums=(0,))
  def _full_logits(self, params, tokens, segments, last):
    logits = self.full_model.apply({"params": params}, tokens, segments)  # (B, L, V)
    return jnp.take_along_axis(logits, last[:, None, None], axis=1)[:, 0]

  def greedy_without_cache(self, prompts: Sequence[Sequence[int]], max_new: int
                           ) -> list[list[int]]:
    """Reference decoding: a full forward pass over the whole sequence for every token."""
    prompts, _ = self._fit(prompts, max_new)
    length = max(len(p) for p in prompts) + max_new
    rows = [list(p) for p in prompts]
    for _ in range(max_new):
      tokens = np.full((len(rows), length), self.pad, np.int32)
      segments = np.zeros_like(tokens)
      for i, r in enumerate(rows):
        tokens[i, :len(r)], segments[i, :len(r)] = r, 1
      last = np.array([len(r) - 1 for r in rows], np.int32)
      nxt = np.asarray(jnp.argmax(self._full_logits(self.params, tokens, segments, last), -1))
      for r, tok in zip(rows, nxt.tolist()):
        r.append(tok)
    return [_until(r[len(p):], self.eos) for r, p in zip(rows, prompts)]


def _until(tokens: list[int], eos: int) -> list[int]:
  return tokens[:tokens.index(eos)] if eos in tokens else tokens
