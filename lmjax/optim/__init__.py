"""Optimizers by name (`optimizer.kind`), learning-rate schedules, clipping, µP's rates.

- `base.py`: the `optimizer` section (`OptimizerConfig`), the `Optimizer` interface and
  its registry (`register`), the weight-decay mask.
- `schedules.py`: warmup, then cosine, linear, constant or warmup-stable-decay.
- `builtin.py`: AdamW (the default, its state unchanged since lmjax 0.1), Lion, Adafactor.
- `muon.py`: Muon for the hidden matrices, AdamW for the rest.
- `schedule_free.py`: schedule-free AdamW, whose parameters are its averaged point.

`make_optimizer` chains global-norm clipping, the configured optimizer and, for a µP
model wider than its base, µP's per-layer rates.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import optax

from lmjax.errors import UserError
from lmjax.optim import builtin, muon, schedule_free  # noqa: F401  (registers lmjax's own)
from lmjax.optim.base import (Optimizer, OptimizerConfig, decay_mask, leaf_names,
                              optimizer_class, optimizer_options, register, registered)
from lmjax.optim.schedules import decay_start, learning_rate_schedule

__all__ = ["Optimizer", "OptimizerConfig", "OptimizerParts", "build_optimizer", "decay_mask",
           "decay_start", "learning_rate_schedule", "make_optimizer", "mup_lr_scale",
           "optimizer_class", "optimizer_options", "register", "registered", "state_bytes"]


@dataclasses.dataclass(frozen=True)
class OptimizerParts:
  tx: optax.GradientTransformation  # clipping, the optimizer, µP's rates
  schedule: optax.Schedule
  # (params, the whole optimizer state) -> where the train step takes its gradient
  gradient_point: Callable[[Any, Any], Any] | None = None


def build_optimizer(cfg: OptimizerConfig, total_steps: int, width_mult: float = 1.0,
                    param_axes: Callable[[], Any] | None = None) -> OptimizerParts:
  """The configured optimizer over `total_steps`. `width_mult` > 1 (a µP model wider
  than its base) adds `mup_lr_scale`; `param_axes()` gives the parameters' logical axis
  names to optimizers that need them (Muon)."""
  optimizer = optimizer_class(cfg.kind)(cfg, total_steps, param_axes)
  schedule = learning_rate_schedule(cfg, total_steps)
  parts = [optax.clip_by_global_norm(cfg.clip_grad_norm)] if cfg.clip_grad_norm > 0 else []
  index = len(parts)  # the optimizer's own state within the chain's
  parts.append(optimizer.transform(schedule))
  if width_mult != 1.0:
    if not optimizer.elementwise:
      raise UserError(f"optimizer.kind={cfg.kind} has no µP rule: a µP model wider than its "
                      "base (model.mup_base_d_model) trains with adamw or lion")
    parts.append(mup_lr_scale(width_mult))
  point = None
  if type(optimizer).gradient_point is not Optimizer.gradient_point:
    point = lambda params, state: optimizer.gradient_point(params, state[index])
  return OptimizerParts(optax.chain(*parts), schedule, point)


def make_optimizer(cfg: OptimizerConfig, total_steps: int, width_mult: float = 1.0,
                   param_axes: Callable[[], Any] | None = None) -> optax.GradientTransformation:
  """The optimizer's optax transformation (see `build_optimizer`)."""
  return build_optimizer(cfg, total_steps, width_mult, param_axes).tx


def mup_lr_scale(width_mult: float) -> optax.GradientTransformation:
  """µP for Adam (Tensor Programs V, Table 3): the updates of hidden matrices, kernels of
  the layers in `model.layers.HIDDEN`, shrink by 1/width_mult, weight decay included as in
  `mup`'s MuAdamW; embeddings, the vocabulary head, norms and biases keep the base rate."""
  from lmjax.model.layers import HIDDEN

  def scale(path, update):
    names = leaf_names(path)
    hidden = len(names) >= 2 and names[-1] == "kernel" and names[-2] in HIDDEN
    return update / width_mult if hidden else update

  def update(updates, state, params=None):
    del params
    return jax.tree_util.tree_map_with_path(scale, updates), state
  return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def state_bytes(opt_state: Any) -> tuple[int, int]:
  """(bytes of the whole optimizer state, bytes of it on the first device): what it costs
  in memory, summed over its arrays (global shapes) and over one device's shards."""
  total = per_device = 0
  device = jax.devices()[0]
  for leaf in jax.tree.leaves(opt_state):
    total += leaf.size * leaf.dtype.itemsize
    shards = getattr(leaf, "addressable_shards", None)
    if shards is None:
      per_device += leaf.size * leaf.dtype.itemsize
      continue
    per_device += sum(s.data.nbytes for s in shards if s.device == device)
  return total, per_device
