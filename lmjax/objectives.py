"""Pretraining objectives: targets for CLM and MLM, and the cross-entropy they share.

Both objectives turn a packed batch into (model inputs, targets, weights).
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
import optax

from lmjax.errors import check_ranges

Array = jax.Array


PRETRAINING = ("clm", "mlm")
TASKS = ("classification", "regression", "qa")  # fine-tuning heads on the same loop


@dataclasses.dataclass(frozen=True)
class ObjectiveConfig:
  # clm | mlm (pretraining) | classification | regression | qa (fine-tuning, set by
  # launch.finetune from the task)
  kind: str = "clm"
  mask_rate: float = 0.15  # MLM: share of ordinary tokens selected as targets (exact per row)
  mask_token_prob: float = 0.8  # of the selected: replaced by [MASK]
  random_token_prob: float = 0.1  # of the selected: replaced by a random token; rest kept
  z_loss: float = 0.0  # weight of log(Z)^2, keeps logits from drifting
  label_smoothing: float = 0.0
  # Vocabulary head + loss fused over chunks of positions, never building the (B, T, V)
  # logits (`fused_cross_entropy_sums`): auto (on CPU, where it is faster) | on | off.
  fused_head: str = "auto"

  def __post_init__(self):
    if self.kind not in PRETRAINING + TASKS:
      raise ValueError(f"objective.kind must be one of {', '.join(PRETRAINING + TASKS)}, "
                       f"got {self.kind!r}")
    check_ranges("objective", self, non_negative=("z_loss", "mask_token_prob", "random_token_prob"),
                 fractions=("label_smoothing",))
    if self.fused_head not in ("auto", "on", "off"):
      raise ValueError(f"objective.fused_head must be auto, on or off, got {self.fused_head!r}")
    if not 0 < self.mask_rate < 1 or self.mask_token_prob + self.random_token_prob > 1:
      raise ValueError("objective: need 0 < mask_rate < 1 and mask_token_prob + "
                       "random_token_prob <= 1")

  def use_fused_head(self) -> bool:
    """Whether the train and eval steps fuse the vocabulary head into the loss. `auto`: on
    CPU, where XLA's (N, V) logits matmuls and their transposes cost a third of a small
    model's step; on TPU and GPU, fused matmuls of the full logits are the faster path."""
    if self.fused_head == "auto":
      return jax.default_backend() == "cpu"
    return self.fused_head == "on"

  def predictions(self, seq_len: int) -> int:
    """Positions per row the vocabulary head runs on: all (CLM), the K MLM targets, or none
    (a task head, whose cost is negligible)."""
    if self.kind in TASKS:
      return 0
    return seq_len if self.kind == "clm" else max_predictions(seq_len, self.mask_rate)


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


def mlm_mask(rng: Array, tokens: Array, segment_ids: Array, cfg: ObjectiveConfig,
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


def cross_entropy_sums(logits: Array, targets: Array, weights: Array, z_loss: float = 0.0,
                       label_smoothing: float = 0.0) -> dict[str, Array]:
  """Weighted sums over tokens of loss terms and correct predictions.

  logits (B, T, V) float32, targets (B, T), weights (B, T). `loss` is the plain
  cross-entropy (reported); `objective` adds smoothing and z-loss (optimised).
  """
  # Accuracy as "the target logit reaches the max", from the max the log-sum-exp needs
  # anyway: argmax is an extra index reduction over (B, T, V) (18 ms of a 350 ms
  # clm_tiny step on CPU). A tie for the max counts as correct (argmax: the first).
  top = jax.lax.stop_gradient(jnp.max(logits, axis=-1))  # (B, T); log_z's gradient is exact
  log_z = top + jnp.log(jnp.sum(jnp.exp(logits - top[..., None]), axis=-1))  # without it
  target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
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


def fused_cross_entropy_sums(features: Array, weight: Array, bias: Array | None,
                             targets: Array, weights: Array, vocab_first: bool,
                             z_loss: float = 0.0, label_smoothing: float = 0.0,
                             chunk_elements: int = 1 << 20,
                             matmul_dtype: jnp.dtype | None = None) -> dict[str, Array]:
  """`cross_entropy_sums(features @ W + bias, ...)` without the (B, L, V) logits.

  features (B, L, D) in the compute dtype; weight (V, D) if `vocab_first` else (D, V);
  bias (V,) or None; targets, weights (B, L). Chunks of positions (about
  `chunk_elements` logits each) are projected, reduced and differentiated in one pass:
  under `jax.grad` the forward pass also leaves d/dfeatures, d/dW and d/dbias of the
  objective, which the backward pass only scales, so neither the logits nor their
  gradient ever exist whole. Only `objective` carries a gradient. `matmul_dtype`: the
  operands of the projection and of d/dfeatures (default: the features' dtype); d/dW is
  summed from float32 values, as in `precision.mixed_matmul`.
  """
  b, length = targets.shape
  vocab = weight.shape[0 if vocab_first else 1]
  chunk = max([c for c in range(1, length + 1)
               if length % c == 0 and b * c * vocab <= chunk_elements] or [1])
  operands = jnp.dtype(matmul_dtype or features.dtype).name
  spec = _FusedSpec(vocab_first, float(z_loss), float(label_smoothing), chunk, operands)
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


def summarize(sums: dict[str, Array]) -> dict[str, Array]:
  """Token-normalised metrics from summed terms: loss, accuracy, perplexity."""
  denom = jnp.maximum(sums["weight"], 1.0)
  loss = sums["loss"] / denom
  return {"loss": loss, "accuracy": sums["correct"] / denom, "perplexity": jnp.exp(loss),
          "tokens": sums["weight"]}


# ----------------------------------------------------------------------------- task heads


def task_sums(kind: str, outputs: Any, batch: dict[str, Array]) -> dict[str, Array]:
  """Summed loss terms of a fine-tuning batch, shaped like `cross_entropy_sums`' (so the
  train step, gradient accumulation and `summarize` serve both); `weight` counts examples.

  classification: logits (B, L), labels (B,); regression: (B, 1), float labels (B,), MSE;
  qa: start and end scores 2 x (B, T), right only if both are.
  """
  weight = batch["weights"]  # (B,) 1 for examples, 0 for padding rows
  ce = optax.softmax_cross_entropy_with_integer_labels
  if kind == "regression":
    loss = jnp.square(outputs[:, 0] - batch["labels"])
    correct = jnp.zeros_like(loss)
  elif kind == "qa":
    start, end = outputs
    loss = (ce(start, batch["starts"]) + ce(end, batch["ends"])) / 2
    correct = ((jnp.argmax(start, -1) == batch["starts"]) &
               (jnp.argmax(end, -1) == batch["ends"])).astype(jnp.float32)
  else:
    loss = ce(outputs, batch["labels"])
    correct = (jnp.argmax(outputs, -1) == batch["labels"]).astype(jnp.float32)
  total = jnp.sum(loss * weight)
  return {"loss": total, "objective": total, "correct": jnp.sum(correct * weight),
          "weight": jnp.sum(weight)}


def task_predictions(kind: str, outputs: Any) -> Array:
  """Per-example predictions for the held-out metrics: a label, a value, or a start."""
  if kind == "regression":
    return outputs[:, 0]
  if kind == "qa":
    return jnp.argmax(outputs[0], -1)
  return jnp.argmax(outputs, -1)


def task_metrics(kind: str, predictions: np.ndarray, targets: np.ndarray, num_labels: int
                 ) -> dict[str, float]:
  """The measures the field reports per task: accuracy, F1 (binary: of class 1; else
  macro) and Matthews correlation for classification; Pearson, Spearman and MSE for
  regression."""
  if kind == "regression":
    return {"pearson": _pearson(predictions, targets),
            "spearman": _pearson(_ranks(predictions), _ranks(targets)),
            "mse": float(np.mean(np.square(predictions - targets)))}
  if kind == "qa":
    return {}
  f1s = [_f1(predictions == c, targets == c) for c in range(num_labels)]
  return {"f1": f1s[1] if num_labels == 2 else float(np.mean(f1s)),
          "mcc": _matthews(predictions, targets, num_labels)}


def _f1(predicted: np.ndarray, actual: np.ndarray) -> float:
  tp = float(np.sum(predicted & actual))
  return 2 * tp / max(float(np.sum(predicted) + np.sum(actual)), 1.0)


def _matthews(predictions: np.ndarray, targets: np.ndarray, num_labels: int) -> float:
  """Gorodkin's multiclass Matthews correlation (the binary MCC for two classes)."""
  c = np.zeros((num_labels, num_labels))
  np.add.at(c, (targets, predictions), 1)
  n, correct = c.sum(), np.trace(c)
  p, t = c.sum(0), c.sum(1)  # predicted, true counts per class
  denom = np.sqrt((n * n - p @ p) * (n * n - t @ t))
  return float((correct * n - t @ p) / denom) if denom else 0.0


def _pearson(x: np.ndarray, y: np.ndarray) -> float:
  x, y = x - x.mean(), y - y.mean()
  denom = np.sqrt(np.sum(x * x) * np.sum(y * y))
  return float(np.sum(x * y) / denom) if denom else 0.0


def _ranks(x: np.ndarray) -> np.ndarray:
  """Ranks with ties averaged (what Spearman's correlation needs)."""
  order = np.argsort(x, kind="stable")
  ranks = np.empty(len(x))
  ranks[order] = np.arange(len(x))
  values, inverse = np.unique(x, return_inverse=True)
  sums = np.bincount(inverse, ranks)
  return (sums / np.bincount(inverse))[inverse]
