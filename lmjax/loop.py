"""The training loop: steps, log lines, checkpoints, and a list of hooks for the rest.

`train_loop(run)` restores or initialises the state, then steps until
`train.steps`. What happens between steps besides logging and checkpointing is a
`Hook`: held-out evaluation, lm-eval tasks, a search's pruner, the profiler and
the preemption watch are all hooks (`default_hooks`), and research code can add
its own. A hook that asks to stop makes the loop save a checkpoint and return,
as a preempted run does.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from lmjax import cooldown, paths
from lmjax.errors import UserError
from lmjax.experiment import Experiment, architecture
from lmjax.lora import runs as lora_runs
from lmjax.metrics import Throughput, describe_parameters, flops_per_token, peak_flops
from lmjax.optim import state_bytes
from lmjax.preemption import PreemptionWatch
from lmjax.sharding import batch_shardings, logical_to_shardings, replicated, unbox
from lmjax.steps import count_params, init_state, jit_steps

Metrics = dict[str, Any]


@dataclasses.dataclass
class LoopContext:
  """What hooks see of the running loop."""

  run: Any  # lmjax.run.TrainingRun
  eval_fn: Callable  # (params, batch, rng) -> eval sums
  put: Callable  # a host batch -> global arrays on the mesh
  speed: Throughput
  eval_metrics: dict[str, float] = dataclasses.field(default_factory=dict)
  evaluated_at: int = -1  # the step of `eval_metrics`

  def evaluate(self, params: Any) -> dict[str, float]:
    """The objective's held-out measures now (kept as the run's latest)."""
    self.eval_metrics = evaluate(self.eval_fn, params, self.run, self.put)
    return self.eval_metrics

  def evaluate_on(self, params: Any, data: Any) -> dict[str, float]:
    """The same measures on other held-out data (a mixture's sources), not kept."""
    return evaluate(self.eval_fn, params, self.run, self.put, data)


class Hook:
  """Called by the loop around each step; every method does nothing by default."""

  def start(self, ctx: LoopContext, step: int) -> None:
    """Once, before the first step of this process (`step`: the restored step)."""

  def before_step(self, step: int) -> None:
    """Before the step that ends at `step`."""

  def after_step(self, ctx: LoopContext, step: int, state: Any, metrics: Metrics
                 ) -> str | None:
    """After step `step`; a reason (\"preempted\", \"pruned\") asks the loop to stop."""
    return None

  def end(self) -> None:
    """Once, however the loop ends."""


def is_due(step: int, every: int, last: int) -> bool:
  return bool(every and step % every == 0) or step == last


class Evaluation(Hook):
  """Held-out evaluation every `train.eval_every` steps and at the last."""

  def after_step(self, ctx, step, state, metrics):
    t = ctx.run.exp.train
    if is_due(step, t.eval_every, t.steps):
      ctx.run.writer.write(step, "eval", ctx.evaluate(state.params), t.steps)
      ctx.evaluated_at = step
      ctx.speed.restart(step)  # keep evaluation out of the training rate


class LmEval(Hook):
  """lm-evaluation-harness tasks on the current weights (`train.lm_eval_*`)."""

  def after_step(self, ctx, step, state, metrics):
    run, t = ctx.run, ctx.run.exp.train
    if is_due(step, t.lm_eval_every, t.steps):
      from lmjax import harness
      tokenizer = paths.join(run.workdir, "tokenizer.model")
      run.writer.write(step, "lm_eval", harness.training_metrics(run.exp, state.params,
                                                                 tokenizer), t.steps)
      ctx.speed.restart(step)


class Pruner(Hook):
  """Asks `should_stop(step, eval_metrics)` (a search's trial reporter) after each
  evaluation; process 0's answer holds for every process, so all stop at the same step."""

  def __init__(self, should_stop: Callable[[int, dict[str, float]], bool]):
    self.should_stop = should_stop

  def after_step(self, ctx, step, state, metrics):
    if ctx.evaluated_at != step:
      return None
    return "pruned" if _agreed(self.should_stop(step, ctx.eval_metrics)) else None


class Preemption(Hook):
  """SIGTERM / Ctrl-C (or JAX's preemption sync point): save this step and stop."""

  def start(self, ctx, step):
    self.watch = PreemptionWatch().__enter__()

  def after_step(self, ctx, step, state, metrics):
    return "preempted" if self.watch.requested(step) else None

  def end(self):
    if hasattr(self, "watch"):
      self.watch.__exit__(None, None, None)


class Profiler(Hook):
  """A jax.profiler trace of steps [first, last] (`train.profile_steps`) into
  WORKDIR/tensorboard, where TensorBoard's profile plugin finds it."""

  def __init__(self, steps: tuple[int, ...], total: int, folder: str):
    self.first, self.last = (steps[0], min(steps[1], total))
    self.folder = folder
    self._local = folder  # a bucket's trace is written locally, then uploaded

  def before_step(self, step):
    if step == self.first:
      self._local = paths.local_staging(self.folder)
      jax.profiler.start_trace(self._local)

  def after_step(self, ctx, step, state, metrics):
    if step == self.last:
      jax.block_until_ready(metrics)  # the traced steps' device work, in full
      jax.profiler.stop_trace()
      if self._local != self.folder:
        paths.put_tree(self._local, self.folder)
        paths.remove_local_staging(self._local, self.folder)
      logging.info("profiled steps %d..%d into %s", self.first, step, self.folder)


def default_hooks(run: Any, should_stop: Callable | None = None) -> list[Hook]:
  """The hooks a run's config asks for, in the order they run after a step."""
  t = run.exp.train
  hooks: list[Hook] = [Evaluation()]
  # the data's own (a mixture's per-source evaluation and wrap counts; duck-typed hooks)
  hooks += getattr(run.train_data, "loop_hooks", lambda run: [])(run)
  if t.lm_eval_tasks:
    hooks.append(LmEval())
  if should_stop is not None:
    hooks.append(Pruner(should_stop))
  if t.profile_steps:
    hooks.append(Profiler(t.profile_steps, t.steps, paths.join(run.workdir, "tensorboard")))
  return hooks + [Preemption()]


def _agreed(stop: bool) -> bool:
  """Process 0's decision, for every process."""
  if jax.process_count() == 1:
    return bool(stop)
  from jax.experimental import multihost_utils
  return bool(multihost_utils.broadcast_one_to_all(np.bool_(stop)))


def evaluate(eval_fn: Callable, params: Any, run: Any, put: Callable, data: Any = None
             ) -> dict[str, float]:
  """The objective's held-out measures over a fixed prefix (or all) of the eval split
  (or of `data`)."""
  t, data = run.exp.train, data if data is not None else run.eval_data
  n = data.num_eval_batches(t.batch_size)
  n = min(n, t.eval_batches) if t.eval_batches else n
  base = jax.random.PRNGKey(t.seed + 1)
  total, examples = None, []
  if getattr(data, "online", False):  # rollouts: sampled with these parameters
    data.bind(params)
  for i in range(n):
    batch = put(data.eval_batch(i, t.batch_size, jax.process_index(), jax.process_count()))
    out = eval_fn(params, batch, jax.random.fold_in(base, i))
    sums = {k: v for k, v in out.items() if v.ndim == 0}  # summed on device
    total = sums if total is None else jax.tree.map(jnp.add, total, sums)
    if len(sums) < len(out):  # per-example arrays, replicated: every process sees all
      examples.append(jax.device_get({k: v for k, v in out.items() if k not in sums}))
  gathered = {k: np.concatenate([e[k] for e in examples]) for k in examples[0]} \
      if examples else {}
  return run.fns.objective.eval_metrics(
      {k: float(v) for k, v in jax.device_get(total).items()}, gathered)


def restore_or_init(run: Any, boxed: Any, shardings: Any) -> Any:
  """The newest intact checkpoint (same architecture only), else a fresh state.

  A step that cannot be read or fails its checksums is moved aside with a
  warning naming it and the reason, and the next older one is tried. A LoRA run's
  checkpoints hold the trainable parameters only; the frozen base comes from
  `train.init_from` again.
  """
  ckpt, fns = run.ckpt, run.fns
  target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                        saved_state(run, unbox(boxed)), saved_state(run, shardings))
  for step in sorted(ckpt.all_steps(), reverse=True):
    try:
      meta = ckpt.read_meta(step)
      check_resumable(meta, run.exp, run.meta["tokenizer_sha256"], ckpt.directory, step)
      lora_runs.check_resume(meta, run.exp.lora, run.base_id, ckpt.directory, step)
      state, _ = ckpt.restore(step, target)
    except UserError:
      raise
    except Exception as e:  # unreadable, truncated, missing files, checksum mismatch
      ckpt.set_aside(step, f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}")
      continue
    logging.info("resumed from %s step %d", ckpt.directory, step)
    if fns.lora is not None:
      state = state.replace(params=fns.with_trainable(_fresh(run, shardings).params,
                                                      state.params))
    return state
  if run.exp.train.branch_from:  # a new branch: the source run's state at its step
    return cooldown.restore_branch(run.exp, target, run.meta["tokenizer_sha256"])
  return _fresh(run, shardings)


def saved_state(run: Any, state: Any) -> Any:
  """What a checkpoint holds: without LoRA the state, with it all but the frozen base."""
  return state.replace(params=run.fns.trainable(state.params))


def _fresh(run: Any, shardings: Any) -> Any:
  """A fresh state, with `train.init_from`'s weights where the run has them."""
  make = functools.partial(init_state, run.fns, run.exp.train.seed, (1, run.exp.data.seq_len))
  state = jax.jit(lambda: unbox(make()), out_shardings=shardings)()
  if run.init_params is not None:  # a new task head is abstract there: it stays fresh
    pick = lambda fresh, loaded, s: (fresh if isinstance(loaded, jax.ShapeDtypeStruct)
                                     else jax.device_put(loaded, s))
    state = state.replace(params=jax.tree.map(pick, state.params, run.init_params,
                                              shardings.params))
  return state


def check_resumable(meta: dict[str, Any], exp: Experiment, tokenizer_sha: str, where: str,
                    step: int) -> None:
  """Refuses to mix a checkpoint of another architecture or tokenizer into this run."""
  saved, current = architecture(meta["config"]["model"]), architecture(exp.to_dict()["model"])
  if saved != current:
    diff = sorted(k for k in set(saved) | set(current) if saved.get(k) != current.get(k))
    raise UserError(f"{where} holds a different architecture (model.{', model.'.join(diff)}"
                    "); use a new --workdir")
  if meta.get("tokenizer_sha256") not in (None, tokenizer_sha):
    raise UserError(f"checkpoint step {step} was trained with another tokenizer")


def check_skips(fetched: list[dict[str, Any]], step: int, skips: int, limit: int) -> int:
  """Updates the count of consecutive non-finite steps; stops the run past `limit`."""
  for offset, metrics in enumerate(fetched):
    skips = skips + 1 if metrics["skipped"] else 0
    if limit and skips >= limit:
      bad = step - len(fetched) + offset + 1
      raise UserError(f"{skips} consecutive steps had a non-finite loss or gradient (last: step "
                      f"{bad}); stopped, the last checkpoint holds the last good parameters. "
                      "Lower optimizer.learning_rate or check the data")
  return skips


class _TrainLog:
  """Train metrics, fetched from the device only at log steps and averaged there."""

  def __init__(self, ctx: LoopContext):
    self.ctx, self.pending, self.skips = ctx, [], 0

  def add(self, step: int, metrics: Metrics) -> None:
    t = self.ctx.run.exp.train
    self.pending.append(metrics)
    if not self.ctx.speed.started:  # keep compilation out of the throughput
      jax.block_until_ready(metrics)
      logging.info("first step (with compilation) took %.1fs", self.ctx.speed.restart(step))
    if not is_due(step, t.log_every, t.steps):
      return
    fetched = jax.device_get(self.pending)
    self.skips = check_skips(fetched, step, self.skips, t.max_consecutive_skips)
    values = {k: float(np.mean([v[k] for v in fetched])) for k in fetched[0] if k != "tokens"}
    values["skipped"] = float(sum(v["skipped"] for v in fetched))
    self.ctx.run.writer.write(step, "train", {**values, **self.ctx.speed.measure(step)}, t.steps)
    self.pending = []


def _start(run: Any) -> tuple[Any, Callable, LoopContext]:
  """The restored or fresh state, the jitted train step and the hooks' context."""
  exp, t, rules = run.exp, run.exp.train, run.exp.mesh.rules
  abstract = jax.eval_shape(functools.partial(init_state, run.fns, t.seed, (1, exp.data.seq_len)))
  shardings = logical_to_shardings(abstract, run.mesh, rules)
  state = restore_or_init(run, abstract, shardings)
  n, i = jax.process_count(), jax.process_index()
  in_shardings = batch_shardings(run.mesh, rules, _sample_batch(run, n, i))
  train_fn, eval_fn = jit_steps(run.fns, shardings, in_shardings, replicated(run.mesh))
  put = lambda b: {k: jax.make_array_from_process_local_data(in_shardings[k], v)
                   for k, v in b.items()}
  seq = exp.data.seq_len
  speed = Throughput(t.batch_size * seq,
                     flops_per_token(exp.model, seq, exp.objective.predictions(seq)),
                     peak_flops(t.peak_flops_per_device) * jax.device_count(), t.steps)
  return state, train_fn, LoopContext(run, eval_fn, put, speed)


def _sample_batch(run: Any, n: int, i: int) -> dict[str, np.ndarray]:
  """A batch of one row per process (for its arrays' ranks); an online objective's (its
  rollouts need parameters) from its `batch_spec`."""
  if not getattr(run.train_data, "online", False):
    return run.train_data.batch(0, n, i, n)
  spec = run.fns.objective.batch_spec(run.exp.data.seq_len)
  return {k: np.zeros((1, *shape), dtype) for k, (shape, dtype) in spec.items()}


def train_loop(run: Any, hooks: list[Hook]) -> dict[str, float]:
  """Steps `run` (an `lmjax.run.TrainingRun`) to `train.steps`, or until a hook stops it;
  returns the latest eval metrics."""
  t = run.exp.train
  state, train_fn, ctx = _start(run)
  step = int(jax.device_get(state.step))
  logging.info("%s: %s; steps %d..%d on %d device(s), mesh %s", run.exp.model.family,
               describe_parameters(run.exp.model, count_params(state.params)), step, t.steps,
               jax.device_count(), dict(run.mesh.shape))
  total, per_device = state_bytes(state.opt_state)
  logging.info("optimizer %s: state %.1f MiB (%.2f bytes per parameter), %.1f MiB on device 0",
               run.exp.optimizer.kind, total / 2**20, total / max(count_params(state.params), 1),
               per_device / 2**20)
  host_batch = lambda s: run.train_data.batch(s, t.batch_size, jax.process_index(),
                                              jax.process_count())
  log = _TrainLog(ctx)
  online = getattr(run.train_data, "online", False)  # its batches need the current params
  try:
    for hook in hooks:
      hook.start(ctx, step)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
      # The next host batch is built during the step, but rollouts only after it.
      upcoming = None if online else pool.submit(host_batch, step)
      while step < t.steps:
        if online:
          run.train_data.bind(state.params, run.workdir)
        batch = ctx.put(host_batch(step) if online else upcoming.result())
        if step + 1 < t.steps and not online:
          upcoming = pool.submit(host_batch, step + 1)
        for hook in hooks:
          hook.before_step(step + 1)
        with jax.profiler.StepTraceAnnotation("train", step_num=step + 1):
          state, metrics = train_fn(state, batch)
        step += 1
        log.add(step, metrics)
        reasons = [r for r in (h.after_step(ctx, step, state, metrics) for h in hooks) if r]
        if is_due(step, t.checkpoint_every, t.steps) or reasons:
          run.ckpt.save(step, saved_state(run, state), {**run.meta, "step": step})
        if reasons:
          run.ckpt.wait()
          logging.warning("%s: checkpoint of step %d is saved; exiting", reasons[0], step)
          return ctx.eval_metrics
  finally:
    for hook in hooks:
      hook.end()
  if ctx.evaluated_at < 0:  # nothing left to train: report the checkpoint as it is
    logging.info("workdir already at step %d of %d; nothing to train", step, t.steps)
    ctx.evaluate(state.params)
  return ctx.eval_metrics
