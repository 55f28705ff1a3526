"""Pretraining objectives: targets for CLM and MLM, and the cross-entropy they share.

Both objectives turn a packed batch into (model inputs, targets, weights).
Losses are sums over tokens; callers divide by the total weight so that
gradient accumulation over microbatches equals one large batch exactly.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np

from lmjax.errors import check_ranges

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class ObjectiveConfig:
  kind: Literal["clm", "mlm"] = "clm"
  mask_rate: float = 0.15  # MLM: share of ordinary tokens selected as targets (exact per row)
  mask_token_prob: float = 0.8  # of the selected: replaced by [MASK]
  random_token_prob: float = 0.1  # of the selected: replaced by a random token; rest kept
  z_loss: float = 0.0  # weight of log(Z)^2, keeps logits from drifting
  label_smoothing: float = 0.0

  def __post_init__(self):
    if self.kind not in ("clm", "mlm"):
      raise ValueError(f"objective.kind must be 'clm' or 'mlm', got {self.kind!r}")
    check_ranges("objective", self, non_negative=("z_loss", "mask_token_prob", "random_token_prob"),
                 fractions=("label_smoothing",))
    if not 0 < self.mask_rate < 1 or self.mask_token_prob + self.random_token_prob > 1:
      raise ValueError("objective: need 0 < mask_rate < 1 and mask_token_prob + "
                       "random_token_prob <= 1")

  def predictions(self, seq_len: int) -> int:
    """Positions per row the output head runs on: all (CLM) or the K MLM targets."""
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
  log_z = jax.nn.logsumexp(logits, axis=-1)  # (B, T)
  target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
  nll = log_z - target_logit  # (B, T)
  objective = nll
  if label_smoothing:
    mean_logit = jnp.mean(logits, axis=-1)
    objective = (1 - label_smoothing) * nll + label_smoothing * (log_z - mean_logit)
  if z_loss:
    objective = objective + z_loss * jnp.square(log_z)
  correct = (jnp.argmax(logits, axis=-1) == targets).astype(jnp.float32)
  return {"loss": jnp.sum(nll * weights), "objective": jnp.sum(objective * weights),
          "correct": jnp.sum(correct * weights), "weight": jnp.sum(weights)}


def summarize(sums: dict[str, Array]) -> dict[str, Array]:
  """Token-normalised metrics from summed terms: loss, accuracy, perplexity."""
  denom = jnp.maximum(sums["weight"], 1.0)
  loss = sums["loss"] / denom
  return {"loss": loss, "accuracy": sums["correct"] / denom, "perplexity": jnp.exp(loss),
          "tokens": sums["weight"]}
