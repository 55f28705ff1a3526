"""Schedule-free AdamW (Defazio et al. 2024, "The Road Less Scheduled"), with the
averaged point as the parameters.

Schedule-free keeps three sequences: z (Adam steps without momentum), x (a running
average of z, weighted by the squared learning rate) and y = b1 x + (1 - b1) z, where
gradients are taken. Evaluation belongs at x. optax's `contrib.schedule_free_adamw`
makes y the parameters and x a function of the optimizer state, so everything that
reads a checkpoint's parameters (evaluation, generation, export, fine-tuning from the
run) would read the wrong point. Here x is the parameters and z the state: the train
step takes its gradient at `gradient_point` (y), and every reader of parameters sees
x without knowing the optimizer. The arithmetic is optax's (its weighting by max
learning rate squared, its Adam without momentum and bias-corrected second moments;
a test holds the two equal), except that both the step's learning rate and the
weights count steps from 0, as the rest of lmjax's schedules do (optax's weighting
counts from 1).

Use it with `schedule=constant` (warmup, then the peak): the averaging replaces the
decay. Memory: z and the second moments, as AdamW's two moments.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from lmjax.optim.base import Optimizer, decay_mask, register


class ScheduleFreeState(NamedTuple):
  count: jax.Array  # int32 steps taken
  weight_sum: jax.Array  # sum of max_lr^2 over steps taken
  max_lr: jax.Array
  z: Any  # the base optimizer's iterate, shaped like the parameters
  base: Any  # the base optimizer's state (second moments)


@register("schedule_free_adamw")
class ScheduleFreeAdamW(Optimizer):
  elementwise = False  # scaling its final update per layer would break the averaging

  def base(self, schedule: optax.Schedule) -> optax.GradientTransformation:
    c = self.cfg
    return optax.chain(
        optax.scale_by_rms(decay=c.b2, eps=c.eps, eps_in_sqrt=False, bias_correction=True),
        optax.add_decayed_weights(c.weight_decay, mask=decay_mask),
        optax.scale_by_learning_rate(schedule))

  def gradient_point(self, params, state):
    b1 = self.cfg.b1
    return jax.tree.map(lambda x, z: b1 * x + (1.0 - b1) * z, params, state.z)

  def transform(self, schedule):
    base = self.base(schedule)

    def init(params):
      return ScheduleFreeState(jnp.zeros([], jnp.int32), jnp.zeros([], jnp.float32),
                               jnp.zeros([], jnp.float32), jax.tree.map(jnp.copy, params),
                               base.init(params))

    def update(grads, state, params):
      y = self.gradient_point(params, state)
      steps, base_state = base.update(grads, state.base, y)
      z = jax.tree.map(jnp.add, state.z, steps)
      max_lr = jnp.maximum(state.max_lr, jnp.asarray(schedule(state.count), jnp.float32))
      weight = max_lr ** 2
      weight_sum = state.weight_sum + weight
      c = jnp.nan_to_num(weight / weight_sum, nan=0.0)  # 0 while the rate is still 0
      updates = jax.tree.map(lambda x, zi: c * (zi - x), params, z)  # x -> (1 - c) x + c z
      return updates, ScheduleFreeState(state.count + 1, weight_sum, max_lr, z, base_state)
    return optax.GradientTransformation(init, update)
