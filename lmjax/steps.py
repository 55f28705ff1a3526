"""The pure train and eval steps, and the one factory of what they need.

`train_step(fns, state, batch) -> (state, metrics)` is jitted once with donated
state and explicit shardings (`jit_steps`). Randomness (MLM masking, dropout)
comes from `fold_in(state.rng, step)` and data from `(seed, step)`, so a resumed
run reproduces an uninterrupted one exactly. The steps know no objective by
name: the run's `Objective` prepares the batch and sums the loss.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from lmjax import lora as lora_lib
from lmjax.model.config import TransformerConfig
from lmjax.objectives import Objective
from lmjax.optim import OptimizerConfig, build_optimizer

Array = jax.Array
Metrics = dict[str, Array]


@flax.struct.dataclass
class TrainState:
  step: Array  # int32 scalar: optimizer steps taken
  params: Any
  opt_state: Any
  rng: Array  # base PRNG key data (uint32[2]); step keys are fold_in(rng, step)


@dataclasses.dataclass(frozen=True)
class StepFns:
  """What the steps need besides state and batch; fixed for a run (`step_fns` builds it)."""

  model: nn.Module  # training model (dropout active if configured)
  eval_model: nn.Module  # deterministic model
  tx: optax.GradientTransformation | None  # None: evaluation only
  schedule: optax.Schedule
  objective: Objective
  grad_accum_steps: int = 1
  # (params, opt_state) -> where the gradient is taken (schedule-free: not the parameters,
  # which are its averaged point); None: at the parameters
  gradient_point: Callable[[Any, Any], Any] | None = None
  lora: Any = None  # lmjax.lora.LoraSpec: only adapters (and a new head) train

  def trainable(self, params: Any) -> Any:
    """The parameters the optimizer updates (all of them without LoRA)."""
    return params if self.lora is None else lora_lib.select(params, self.lora.trainable)

  def with_trainable(self, params: Any, trainable: Any) -> Any:
    return trainable if self.lora is None else lora_lib.combine(params, trainable)


def step_fns(model: TransformerConfig, objective: Objective,
             optimizer: OptimizerConfig | None = None, steps: int = 1,
             grad_accum_steps: int = 1, lora: lora_lib.LoraConfig | None = None,
             seq_len: int = 8) -> StepFns:
  """The models the objective needs (with dropout for training, without for evaluation)
  and, given an optimizer, its update and schedule over `steps`; with `lora` active, the
  models apply the adapters their parameters hold (dense layers traced on `seq_len`)."""
  train = objective.build_model(model, deterministic=model.dropout_rate == 0)
  evaluate = objective.build_model(model, True)
  tx, schedule, point = None, optax.constant_schedule(0.0), None
  if optimizer is not None:
    built = build_optimizer(optimizer, steps, model.width_mult,
                            functools.partial(param_axes, evaluate))
    tx, schedule, point = built.tx, built.schedule, built.gradient_point
  spec = None
  if lora is not None and lora.active:
    spec = lora_lib.make_spec(lora, evaluate, seq_len, objective.is_new_param)
    train, evaluate = spec.wrap(train, True), spec.wrap(evaluate, False)
  return StepFns(train, evaluate, tx, schedule, objective, grad_accum_steps, point, spec)


def param_axes(model: nn.Module) -> Any:
  """The logical axis names of each of `model`'s parameters (a tree of tuples), from
  its abstract initialisation: what optimizers that treat axes apart read (Muon)."""
  dummy = jnp.zeros((1, 8), jnp.int32)
  boxed = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), dummy,
                                            jnp.ones_like(dummy))["params"])
  return jax.tree.map(lambda x: tuple(x.names) if isinstance(x, nn.Partitioned) else
                      (None,) * len(x.shape), boxed,
                      is_leaf=lambda x: isinstance(x, nn.Partitioned))


def train_step(fns: StepFns, state: TrainState, batch: dict[str, Array]
               ) -> tuple[TrainState, Metrics]:
  """One optimizer step over `grad_accum_steps` microbatches; exact as one big batch."""
  mask_rng, dropout_rng = jax.random.split(jax.random.fold_in(state.rng, state.step))
  objective = fns.objective
  b = objective.prepare(batch, mask_rng)
  total = jnp.maximum(jnp.sum(b["weights"]), 1.0)  # targets in the whole batch

  def loss_fn(trainable, micro, rng):
    params = fns.with_trainable(state.params, trainable)
    sums = objective.loss_sums(fns.model, params, micro, {"dropout": rng})
    return sums["objective"] / total, sums

  trainable = fns.trainable(state.params)  # LoRA: no gradient for the frozen base
  at = fns.gradient_point(trainable, state.opt_state) if fns.gradient_point else trainable
  grads, sums = _accumulated(jax.grad(loss_fn, has_aux=True), at, b, dropout_rng,
                             fns.grad_accum_steps)
  updates, opt_state = fns.tx.update(grads, state.opt_state, trainable)
  new_trainable = optax.apply_updates(trainable, updates)
  grad_norm = optax.tree.norm(grads)
  # A non-finite loss or gradient skips the update: parameters and optimizer state stay.
  finite = jnp.isfinite(sums["objective"]) & jnp.isfinite(grad_norm)
  keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)
  metrics = objective.metrics(sums)
  metrics.update(grad_norm=grad_norm, learning_rate=fns.schedule(state.step),
                 skipped=1.0 - finite.astype(jnp.float32))
  params = fns.with_trainable(state.params, keep(new_trainable, trainable))
  new_state = state.replace(step=state.step + 1, params=params,
                            opt_state=keep(opt_state, state.opt_state))
  return new_state, metrics


def _accumulated(grad_fn: Callable, params: Any, batch: dict[str, Array], rng: Array, n: int
                 ) -> tuple[Any, dict[str, Array]]:
  """(gradient, summed terms) of the batch as `n` microbatches, scanned."""
  if n == 1:
    return grad_fn(params, batch, rng)
  micro = jax.tree.map(lambda x: x.reshape(n, x.shape[0] // n, *x.shape[1:]), batch)

  def accumulate(carry, xs):
    i, mb = xs
    g, s = grad_fn(params, mb, jax.random.fold_in(rng, i))
    return jax.tree.map(jnp.add, carry, (g, s)), None

  first = jax.tree.map(lambda x: x[0], micro)  # the sums' structure: the objective's keys
  shapes = jax.eval_shape(grad_fn, params, first, rng)
  zero = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
  return jax.lax.scan(accumulate, zero, (jnp.arange(n), micro))[0]


def eval_step(fns: StepFns, params: Any, batch: dict[str, Array], rng: Array
              ) -> dict[str, Array]:
  """The objective's eval terms of one batch (MLM masks drawn from a fixed `rng`): scalars
  to sum over the eval set, per-example arrays to gather."""
  b = fns.objective.prepare(batch, rng)
  return fns.objective.eval_sums(fns.eval_model, params, b)


def init_state(fns: StepFns, seed: int, batch_shape: tuple[int, int]) -> TrainState:
  """A fresh state; parameters stay boxed with their logical axis names."""
  rng = jax.random.PRNGKey(seed)
  dummy = jnp.zeros(batch_shape, jnp.int32)
  params = fns.eval_model.init(jax.random.fold_in(rng, 1 << 30), dummy,
                               jnp.ones_like(dummy))["params"]
  if fns.lora is not None:  # fresh adapters; the base (replaced by the source's) frozen
    params = fns.lora.prepare(params, jax.random.fold_in(rng, 1 << 29))
  return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                    opt_state=fns.tx.init(fns.trainable(params)), rng=rng)


def jit_steps(fns: StepFns, state_sharding: Any, batch_shardings: dict[str, Any],
              replicated: Any) -> tuple[Callable, Callable]:
  """Jitted (train_step, eval_step) with explicit shardings; the state is donated."""
  train = jax.jit(functools.partial(train_step, fns),
                  in_shardings=(state_sharding, batch_shardings),
                  out_shardings=(state_sharding, replicated), donate_argnums=(0,))
  evaluate = jax.jit(functools.partial(eval_step, fns),
                     in_shardings=(state_sharding.params, batch_shardings, replicated),
                     out_shardings=replicated)
  return train, evaluate


def count_params(params: Any) -> int:
  return sum(int(x.size) for x in jax.tree.leaves(params))
