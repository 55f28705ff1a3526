"""AdamW with warmup and decay, weight decay masked off norms and biases, clipping."""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

import jax
import optax

from lmjax.errors import check_ranges


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
  learning_rate: float = 3e-4  # peak, reached at the end of warmup
  warmup_steps: int = 100
  schedule: Literal["cosine", "linear", "constant"] = "cosine"  # decay after warmup
  end_lr_ratio: float = 0.1  # final learning rate as a fraction of the peak
  b1: float = 0.9
  b2: float = 0.95
  eps: float = 1e-8
  weight_decay: float = 0.1  # applied to kernels and embeddings only
  clip_grad_norm: float = 1.0  # global-norm clipping; 0 disables

  def __post_init__(self):
    if self.schedule not in ("cosine", "linear", "constant"):
      raise ValueError(f"optimizer.schedule must be cosine, linear or constant, got {self.schedule!r}")
    check_ranges("optimizer", self, positive=("eps",),
                 non_negative=("learning_rate", "warmup_steps", "end_lr_ratio", "weight_decay",
                               "clip_grad_norm"),
                 fractions=("b1", "b2"))


def learning_rate_schedule(cfg: OptimizerConfig, total_steps: int) -> optax.Schedule:
  warmup = max(min(cfg.warmup_steps, total_steps - 1), 0)
  end = cfg.learning_rate * cfg.end_lr_ratio
  decay_steps = max(total_steps - warmup, 1)
  if cfg.schedule == "cosine":
    decay = optax.cosine_decay_schedule(cfg.learning_rate, decay_steps, cfg.end_lr_ratio)
  elif cfg.schedule == "linear":
    decay = optax.linear_schedule(cfg.learning_rate, end, decay_steps)
  else:
    decay = optax.constant_schedule(cfg.learning_rate)
  if warmup == 0:
    return decay
  ramp = optax.linear_schedule(0.0, cfg.learning_rate, warmup)
  return optax.join_schedules([ramp, decay], [warmup])


def decay_mask(params: Any) -> Any:
  """True for matmul kernels and embeddings; norms' scales and all biases are not decayed.

  Decided by parameter name, not rank: scanned stacks give biases a layer axis.
  """
  def is_decayed(path, _):
    names = [k.key for k in path if isinstance(k, jax.tree_util.DictKey)]  # skips boxes
    return bool(names) and names[-1] in ("kernel", "embedding")
  return jax.tree_util.tree_map_with_path(is_decayed, params)


def mup_lr_scale(width_mult: float) -> optax.GradientTransformation:
  """µP for Adam (Tensor Programs V, Table 3): the updates of hidden matrices, kernels of
  the layers in `model.layers.HIDDEN`, shrink by 1/width_mult, weight decay included as in
  `mup`'s MuAdamW; embeddings, the vocabulary head, norms and biases keep the base rate."""
  from lmjax.model.layers import HIDDEN

  def scale(path, update):
    names = [k.key for k in path if isinstance(k, jax.tree_util.DictKey)]
    hidden = len(names) >= 2 and names[-1] == "kernel" and names[-2] in HIDDEN
    return update / width_mult if hidden else update

  def update(updates, state, params=None):
    del params
    return jax.tree_util.tree_map_with_path(scale, updates), state
  return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def make_optimizer(cfg: OptimizerConfig, total_steps: int, width_mult: float = 1.0
                   ) -> optax.GradientTransformation:
  """AdamW as configured; `width_mult` > 1 (a µP model wider than its base) adds the
  per-parameter learning rates of `mup_lr_scale`."""
  parts = [optax.clip_by_global_norm(cfg.clip_grad_norm)] if cfg.clip_grad_norm > 0 else []
  parts.append(optax.adamw(learning_rate_schedule(cfg, total_steps), b1=cfg.b1, b2=cfg.b2,
                           eps=cfg.eps, weight_decay=cfg.weight_decay, mask=decay_mask))
  if width_mult != 1.0:
    parts.append(mup_lr_scale(width_mult))
  return optax.chain(*parts)
