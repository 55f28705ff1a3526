"""The losses objectives share: CLM and MLM targets, cross-entropy (plain, and fused with
the vocabulary head), and the metrics of summed terms.

Losses are sums over tokens; callers divide by the total weight so that
gradient accumulation over microbatches equals one large batch exactly.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lmjax.model.moe import router_metrics


Array = jax.Array


def clm_targets(tokens: Array, segment_ids: Array) -> tuple[Array, Array]:
  """Next-token targets within a document; no target across a boundary or on padding.

  tokens, segment_ids: (B, T) -> targets (B, T) int32, weights (B, T) float32.
  """
  targets = jnp.pad(tokens[:, 1:], ((0, 0), (0, 1)))
  next_seg = jnp.pad(segment_ids[:, 1:], ((0, 0), (0, 1)))
  weights = (next_seg == segment_ids) & (segment_ids != 0)
  return targets, weights.astype(jnp.float32)


def max_predictions(seq_len: int, mask_rate: float) -> int:
  """Positions per row the MLM head is applied to: ceil(mask_rate * seq_len)."""
  return max(1, math.ceil(mask_rate * seq_len))


def mlm_mask(rng: Array, tokens: Array, segment_ids: Array, cfg: Any,
             mask_id: int, special_ids: tuple[int, ...], vocab_size: int
             ) -> tuple[Array, Array, Array, Array]:
  """BERT masking: select round(mask_rate x ordinary tokens) per row, then 80/10/10
  mask/random/keep.

  An exact count per row, as the original BERT data pipeline, bounds the targets by
  K = `max_predictions(T, mask_rate)`, so the MLM head and the loss run on (B, K)
  gathered positions instead of all (B, T) (the head is a quarter of a small BERT's
  FLOPs). Padding and special tokens are never selected; random replacements are
  ordinary tokens. Returns inputs (B, T) and positions, targets, weights (B, K);
  weight 0 marks unused slots of rows with fewer ordinary tokens.
  """
  select_key, action_key, random_key = jax.random.split(rng, 3)
  ordinary = ~jnp.isin(tokens, jnp.asarray(special_ids)) & (segment_ids != 0)
  k = max_predictions(tokens.shape[1], cfg.mask_rate)
  scores = jnp.where(ordinary, jax.random.uniform(select_key, tokens.shape), 2.0)
  _, positions = jax.lax.top_k(-scores, k)  # (B, K): ordinary tokens in random order first
  count = jnp.round(cfg.mask_rate * jnp.sum(ordinary, axis=1))  # (B,)
  weights = jnp.arange(k)[None, :] < count[:, None]  # (B, K)
  rows = jnp.arange(tokens.shape[0])[:, None]
  selected = jnp.zeros(tokens.shape, bool).at[rows, positions].set(weights)  # (B, T)
  u = jax.random.uniform(action_key, tokens.shape)
  use_mask = selected & (u < cfg.mask_token_prob)
  use_random = selected & (u >= cfg.mask_token_prob) & (
      u < cfg.mask_token_prob + cfg.random_token_prob)
  ordinary_ids = np.setdiff1d(np.arange(vocab_size), np.asarray(special_ids))  # static table
  random_tokens = jnp.asarray(ordinary_ids, jnp.int32)[
      jax.random.randint(random_key, tokens.shape, 0, ordinary_ids.size)]
  inputs = jnp.where(use_mask, mask_id, jnp.where(use_random, random_tokens, tokens))
  targets = jnp.take_along_axis(tokens, positions, axis=1)
  return inputs, positions, targets, weights.astype(jnp.float32)


def _target_terms(logits: Array, targets: Array) -> tuple[Array, Array, Array]:
  """(max logit, log-sum-exp, target logit), each shaped like `targets`. The max is held
  out of the gradient; the log-sum-exp's gradient is exact without it."""
  top = jax.lax.stop_gradient(jnp.max(logits, axis=-1))
  log_z = top + jnp.log(jnp.sum(jnp.exp(logits - top[..., None]), axis=-1))
  target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
  return top, log_z, target_logit


def target_logprobs(logits: Array, targets: Array) -> Array:
  """log softmax(logits)[target], in float32: logits (..., V), targets (...) -> (...).

  The one place lmjax reads log-probabilities of given tokens: the losses, DPO's
  completions, the lm-eval harness and the server's `logprobs` all call it.
  """
  _, log_z, target_logit = _target_terms(logits.astype(jnp.float32), targets)
  return target_logit - log_z


def cross_entropy_sums(logits: Array, targets: Array, weights: Array, z_loss: float = 0.0,
                       label_smoothing: float = 0.0) -> dict[str, Array]:
  """Weighted sums over tokens of loss terms and correct predictions.

  logits (B, T, V) float32, targets (B, T), weights (B, T). `loss` is the plain
  cross-entropy (reported); `objective` adds smoothing and z-loss (optimised).
  """
  # Accuracy as "the target logit reaches the max", from the max the log-sum-exp needs
  # anyway: argmax is an extra index reduction over (B, T, V) (18 ms of a 350 ms
  # clm_tiny step on CPU). A tie for the max counts as correct (argmax: the first).
  top, log_z, target_logit = _target_terms(logits, targets)
  nll = log_z - target_logit  # (B, T)
  objective = nll
  if label_smoothing:
    mean_logit = jnp.mean(logits, axis=-1)
    objective = (1 - label_smoothing) * nll + label_smoothing * (log_z - mean_logit)
  if z_loss:
    objective = objective + z_loss * jnp.square(log_z)
  correct = (target_logit >= top).astype(jnp.float32)
  return {"loss": jnp.sum(nll * weights), "objective": jnp.sum(objective * weights),
          "correct": jnp.sum(correct * weights), "weight": jnp.sum(weights)}


# ------------------------------------------------------- vocabulary head fused into the loss


@dataclasses.dataclass(frozen=True)
class _FusedSpec:
  vocab_first: bool  # weight (V, D) (a tied embedding) or (D, V) (a head kernel)
  z_loss: float
  label_smoothing: float
  chunk: int  # positions per chunk, divides L
  operands: str  # dtype of the projection's operands (sums in float32)
  softcap: float = 0.0  # logits -> c tanh(logits / c) (Gemma's final soft-capping)


def fused_cross_entropy_sums(features: Array, weight: Array, bias: Array | None,
                             targets: Array, weights: Array, vocab_first: bool,
                             z_loss: float = 0.0, label_smoothing: float = 0.0,
                             chunk_elements: int = 1 << 20,
                             matmul_dtype: jnp.dtype | None = None,
                             softcap: float = 0.0) -> dict[str, Array]:
  """`cross_entropy_sums(features @ W + bias, ...)` without the (B, L, V) logits.

  features (B, L, D) in the compute dtype; weight (V, D) if `vocab_first` else (D, V);
  bias (V,) or None; targets, weights (B, L). Chunks of positions (about
  `chunk_elements` logits each) are projected, reduced and differentiated in one pass:
  under `jax.grad` the forward pass also leaves d/dfeatures, d/dW and d/dbias of the
  objective, which the backward pass only scales, so neither the logits nor their
  gradient ever exist whole. Only `objective` carries a gradient. `matmul_dtype`: the
  operands of the projection and of d/dfeatures (default: the features' dtype); d/dW is
  summed from float32 values, as in `precision.mixed_matmul`. `softcap` caps the logits
  at c tanh(logits / c) before the loss (Gemma 2's final soft-capping).
  """
  b, length = targets.shape
  vocab = weight.shape[0 if vocab_first else 1]
  chunk = max([c for c in range(1, length + 1)
               if length % c == 0 and b * c * vocab <= chunk_elements] or [1])
  operands = jnp.dtype(matmul_dtype or features.dtype).name
  spec = _FusedSpec(vocab_first, float(z_loss), float(label_smoothing), chunk, operands,
                    float(softcap))
  objective, (loss, correct) = _fused_sums(features, weight, bias, targets, weights, spec)
  return {"loss": jax.lax.stop_gradient(loss), "objective": objective,
          "correct": jax.lax.stop_gradient(correct), "weight": jnp.sum(weights)}


def _chunk_sums(spec: _FusedSpec, h: Array, w: Array, bias: Array | None, targets: Array,
                weights: Array, grads: bool):
  """Loss sums of one chunk (B, c) and, if `grads`, d/dlogits of the weighted objective."""
  contract = ((h.ndim - 1,), (1 if spec.vocab_first else 0,))
  logits = jax.lax.dot_general(h.astype(spec.operands), w.astype(spec.operands),
                               (contract, ((), ())),
                               preferred_element_type=jnp.float32)  # (B, c, V)
  if bias is not None:
    logits = logits + bias.astype(jnp.float32)
  if spec.softcap:
    logits = spec.softcap * jnp.tanh(logits / spec.softcap)
  top = jnp.max(logits, axis=-1)
  e = jnp.exp(logits - top[..., None])
  z = jnp.sum(e, axis=-1)
  log_z = top + jnp.log(z)
  target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
  nll = log_z - target_logit
  ls = spec.label_smoothing
  objective = (1 - ls) * nll + ls * (log_z - jnp.mean(logits, axis=-1)) if ls else nll
  if spec.z_loss:
    objective = objective + spec.z_loss * jnp.square(log_z)
  sums = (jnp.sum(objective * weights), jnp.sum(nll * weights),
          jnp.sum((target_logit >= top) * weights))
  if not grads:
    return sums, None
  # d objective / d logits = (1 + 2 z log Z) softmax - (1 - ls) onehot - ls / V, per weight.
  scale = (1 + 2 * spec.z_loss * log_z) / z
  onehot = jax.lax.broadcasted_iota(jnp.int32, logits.shape, 2) == targets[..., None]
  d = e * scale[..., None] - jnp.where(onehot, 1 - ls, 0.0) - ls / logits.shape[-1]
  if spec.softcap:  # through the cap: d tanh(u) / du = 1 - tanh(u)^2
    d = d * (1 - jnp.square(logits / spec.softcap))
  return sums, d * weights[..., None]


def _fused_terms(h, w, bias, targets, weights, spec: _FusedSpec, grads: bool):
  """Scans `_chunk_sums` over chunks of positions; returns the sums and, with `grads`,
  (d features, d weight, d bias)."""
  b, length, dim = h.shape
  n = length // spec.chunk
  split = lambda x: jnp.moveaxis(x.reshape(b, n, spec.chunk, *x.shape[2:]), 1, 0)
  xs = (split(h), split(targets), split(weights))

  def body(carry, x):
    hc, tc, wc = x
    sums, d = _chunk_sums(spec, hc, w, bias, tc, wc, grads)
    if not grads:
      return jax.tree.map(jnp.add, carry, sums), None
    totals, dw, db = carry  # d weight accumulates here: one (D, V) buffer, not one per chunk
    dh = jax.lax.dot_general(d.astype(spec.operands), w.astype(spec.operands),
                             (((2,), (0 if spec.vocab_first else 1,)), ((), ())),
                             preferred_element_type=jnp.float32).astype(h.dtype)  # (B, c, D)
    rows = lambda x: x.reshape(-1, x.shape[-1]).astype(h.dtype)
    pair = (rows(d), rows(hc)) if spec.vocab_first else (rows(hc), rows(d))
    dw = dw + jax.lax.dot_general(*pair, (((0,), (0,)), ((), ())),
                                  preferred_element_type=jnp.float32)  # (V, D) or (D, V)
    return (jax.tree.map(jnp.add, totals, sums), dw, db + jnp.sum(d, axis=(0, 1))), dh

  zero = (jnp.zeros((), jnp.float32),) * 3
  if not grads:
    return jax.lax.scan(body, zero, xs)[0], None
  vocab = w.shape[0 if spec.vocab_first else 1]
  init = (zero, jnp.zeros(w.shape, jnp.float32), jnp.zeros(vocab, jnp.float32))
  (sums, dw, db), dh = jax.lax.scan(body, init, xs)
  dh = jnp.moveaxis(dh, 0, 1).reshape(b, length, dim)
  return sums, (dh, dw.astype(w.dtype), None if bias is None else db.astype(bias.dtype))


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _fused_sums(h, w, bias, targets, weights, spec):
  (objective, loss, correct), _ = _fused_terms(h, w, bias, targets, weights, spec, False)
  return objective, (loss, correct)


def _fused_sums_fwd(h, w, bias, targets, weights, spec):
  (objective, loss, correct), grads = _fused_terms(h, w, bias, targets, weights, spec, True)
  return (objective, (loss, correct)), grads


def _fused_sums_bwd(spec, grads, cotangents):
  g = cotangents[0]  # loss and correct leave through stop_gradient: no cotangent
  dh, dw, db = grads
  scale = lambda x: None if x is None else (g * x).astype(x.dtype)
  return scale(dh), scale(dw), scale(db), None, None


_fused_sums.defvjp(_fused_sums_fwd, _fused_sums_bwd)


def token_metrics(sums: dict[str, Array]) -> dict[str, Array]:
  """Token-normalised metrics from summed terms: loss, accuracy, perplexity."""
  denom = jnp.maximum(sums["weight"], 1.0)
  loss = sums["loss"] / denom
  return {"loss": loss, "accuracy": sums["correct"] / denom, "perplexity": jnp.exp(loss),
          "tokens": sums["weight"], **router_metrics(sums)}  # + a mixture of experts' losses
