"""Learning-rate schedules: linear warmup, then cosine, linear, constant or warmup-stable-decay.

Warmup-stable-decay (`schedule=wsd`) holds the peak after warmup and decays only over
the last stretch of the run (`decay_start`, `decay_steps` or `decay_fraction`), in a
linear, cosine or 1-sqrt shape (Hägele et al. 2024, "Scaling Laws and Compute-Optimal
Training Beyond Fixed Training Durations"). Until the decay starts it is the peak
exactly, as a `constant` schedule is, so a cooldown branched from a stable run's
checkpoint (`train.branch_from`) continues it bit for bit (`lmjax/cooldown.py`).
"""

from __future__ import annotations

import jax.numpy as jnp
import optax

from lmjax.optim.base import OptimizerConfig


def learning_rate_schedule(cfg: OptimizerConfig, total_steps: int) -> optax.Schedule:
  """The learning rate at each step count (0 before the first update)."""
  warmup = max(min(cfg.warmup_steps, total_steps - 1), 0)
  end = cfg.learning_rate * cfg.end_lr_ratio
  decay_steps = max(total_steps - warmup, 1)
  if cfg.schedule == "cosine":
    decay = optax.cosine_decay_schedule(cfg.learning_rate, decay_steps, cfg.end_lr_ratio)
  elif cfg.schedule == "linear":
    decay = optax.linear_schedule(cfg.learning_rate, end, decay_steps)
  elif cfg.schedule == "wsd":
    decay = _stable_then_decay(cfg, decay_start(cfg, total_steps) - warmup,
                               total_steps - decay_start(cfg, total_steps))
  else:
    decay = optax.constant_schedule(cfg.learning_rate)
  if warmup == 0:
    return decay
  ramp = optax.linear_schedule(0.0, cfg.learning_rate, warmup)
  return optax.join_schedules([ramp, decay], [warmup])


def decay_start(cfg: OptimizerConfig, total_steps: int) -> int:
  """The step count at which a wsd schedule leaves its peak (never inside the warmup;
  `total_steps` or more: no decay, a stable run)."""
  warmup = max(min(cfg.warmup_steps, total_steps - 1), 0)
  if cfg.decay_start:
    start = cfg.decay_start
  elif cfg.decay_steps:
    start = total_steps - cfg.decay_steps
  else:
    start = total_steps - round(cfg.decay_fraction * total_steps)
  return max(start, warmup)


def _stable_then_decay(cfg: OptimizerConfig, stable: int, length: int) -> optax.Schedule:
  """The peak for `stable` steps, then `length` steps of decay towards the end rate."""
  peak, end = cfg.learning_rate, cfg.learning_rate * cfg.end_lr_ratio
  shape = {"linear": lambda t: 1.0 - t,
           "cosine": lambda t: 0.5 * (1.0 + jnp.cos(jnp.pi * t)),
           "1-sqrt": lambda t: 1.0 - jnp.sqrt(t)}[cfg.decay_shape]

  def schedule(count):
    t = jnp.clip((count - stable) / max(length, 1), 0.0, 1.0)  # 0 at the decay's first step
    decayed = end + (peak - end) * shape(t)
    return jnp.where(count < stable, peak, decayed)
  return schedule
