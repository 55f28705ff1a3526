"""Pure train/eval steps and the training loop.

`train_step(state, batch) -> (state, metrics)` is jitted once with donated
state and explicit shardings. Randomness (MLM masking, dropout) comes from
`fold_in(state.rng, step)`, data from `(seed, step)`, so a resumed run
reproduces an uninterrupted one exactly.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import json
from typing import Any, Callable

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging

from lmjax import __version__, objectives, paths
from lmjax.checkpoint import Checkpointer
from lmjax.data.special import SpecialTokens
from lmjax.data.tokenizer_io import install_tokenizer
from lmjax.errors import UserError
from lmjax.experiment import NON_ARCHITECTURE_FIELDS, Experiment, architecture
from lmjax.metrics import MetricsWriter, Throughput, flops_per_token, peak_flops
from lmjax.model import precision
from lmjax.objectives import Objective, ObjectiveConfig
from lmjax.optim import learning_rate_schedule, make_optimizer
from lmjax.preemption import PreemptionWatch
from lmjax.sharding import batch_shardings, logical_to_shardings, make_mesh, replicated, unbox

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
  """What the steps need besides state and batch; fixed for a run."""

  model: nn.Module  # training model (dropout active if configured)
  eval_model: nn.Module  # deterministic model
  tx: optax.GradientTransformation
  schedule: optax.Schedule
  objective: Objective  # or its ObjectiveConfig, built here through the registry
  special: SpecialTokens
  grad_accum_steps: int = 1

  def __post_init__(self):
    if isinstance(self.objective, ObjectiveConfig):
      object.__setattr__(self, "objective", objectives.build(
          self.objective, self.special, self.model.cfg.vocab_size))


def train_step(fns: StepFns, state: TrainState, batch: dict[str, Array]
               ) -> tuple[TrainState, Metrics]:
  """One optimizer step over `grad_accum_steps` microbatches; exact as one big batch."""
  mask_rng, dropout_rng = jax.random.split(jax.random.fold_in(state.rng, state.step))
  objective = fns.objective
  b = objective.prepare(batch, mask_rng)
  total = jnp.maximum(jnp.sum(b["weights"]), 1.0)  # targets in the whole batch

  def loss_fn(params, micro, rng):
    sums = objective.loss_sums(fns.model, params, micro, {"dropout": rng})
    return sums["objective"] / total, sums

  grad_fn = jax.grad(loss_fn, has_aux=True)
  n = fns.grad_accum_steps
  if n == 1:
    grads, sums = grad_fn(state.params, b, dropout_rng)
  else:
    micro = jax.tree.map(lambda x: x.reshape(n, x.shape[0] // n, *x.shape[1:]), b)

    def accumulate(carry, xs):
      i, mb = xs
      g, s = grad_fn(state.params, mb, jax.random.fold_in(dropout_rng, i))
      return jax.tree.map(jnp.add, carry, (g, s)), None

    first = jax.tree.map(lambda x: x[0], micro)  # the sums' structure: the objective's keys
    shapes = jax.eval_shape(grad_fn, state.params, first, dropout_rng)
    zero = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
    (grads, sums), _ = jax.lax.scan(accumulate, zero, (jnp.arange(n), micro))
  updates, opt_state = fns.tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  grad_norm = optax.tree.norm(grads)
  # A non-finite loss or gradient skips the update: parameters and optimizer state stay.
  finite = jnp.isfinite(sums["objective"]) & jnp.isfinite(grad_norm)
  keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)
  metrics = objective.summarize(sums)
  metrics.update(grad_norm=grad_norm, learning_rate=fns.schedule(state.step),
                 skipped=1.0 - finite.astype(jnp.float32))
  new_state = state.replace(step=state.step + 1, params=keep(params, state.params),
                            opt_state=keep(opt_state, state.opt_state))
  return new_state, metrics


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
  return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                    opt_state=fns.tx.init(params), rng=rng)


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


# ----------------------------------------------------------------------------- the loop


def check_experiment(exp: Experiment, tokenizer_vocab: int, data_parallel: int) -> None:
  m, t, d = exp.model, exp.train, exp.data
  if d.seq_len > m.max_len:
    raise UserError(f"data.seq_len={d.seq_len} exceeds model.max_len={m.max_len}")
  if tokenizer_vocab > m.vocab_size:
    raise UserError(f"tokenizer has {tokenizer_vocab} pieces but model.vocab_size={m.vocab_size}")
  if t.batch_size % t.grad_accum_steps:
    raise UserError(f"train.batch_size={t.batch_size} is not divisible by "
                    f"train.grad_accum_steps={t.grad_accum_steps}")
  if (t.batch_size // t.grad_accum_steps) % data_parallel:
    raise UserError(f"microbatch {t.batch_size // t.grad_accum_steps} is not divisible by the "
                    f"data-parallel size {data_parallel} (mesh data x fsdp)")
  if t.init_from and not paths.isdir(t.init_from):
    raise UserError(f"train.init_from={t.init_from} is not a directory (an lmjax run or a "
                    "Hugging Face model directory)")
  if t.lm_eval_tasks and (m.family != "decoder" or jax.process_count() > 1):
    raise UserError("train.lm_eval_tasks scores decoders in one-process runs; evaluate "
                    "checkpoints of this run with `python -m launch.lm_eval`")
  if t.steps < 1 or t.log_every < 1 or t.checkpoint_every < 1:
    raise UserError("train.steps, train.log_every and train.checkpoint_every must be >= 1")


def restore_or_init(fns: StepFns, exp: Experiment, ckpt: Checkpointer, boxed: Any,
                    shardings: Any, tokenizer_sha: str, init_params: Any = None) -> TrainState:
  """The newest intact checkpoint (same architecture only), else a fresh state.

  A step that cannot be read or fails its checksums is moved aside with a
  warning naming it and the reason, and the next older one is tried.
  """
  make = functools.partial(init_state, fns, exp.train.seed, (1, exp.data.seq_len))
  target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                        unbox(boxed), shardings)
  for step in sorted(ckpt.all_steps(), reverse=True):
    try:
      meta = ckpt.read_meta(step)
      check_resumable(meta, exp, tokenizer_sha, ckpt.directory, step)
      state, _ = ckpt.restore(step, target)
    except UserError:
      raise
    except Exception as e:  # unreadable, truncated, missing files, checksum mismatch
      ckpt.set_aside(step, f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}")
      continue
    logging.info("resumed from %s step %d", ckpt.directory, step)
    return state
  state = jax.jit(lambda: unbox(make()), out_shardings=shardings)()
  if init_params is not None:  # from train.init_from (checked in setup_run) or a task's
    # backbone; a new task head is left abstract there and keeps its fresh values.
    pick = lambda fresh, loaded, s: (fresh if isinstance(loaded, jax.ShapeDtypeStruct)
                                     else jax.device_put(loaded, s))
    state = state.replace(params=jax.tree.map(pick, state.params, init_params, shardings.params))
  return state


def pretrained_params(exp: Experiment, fresh: Any, tokenizer_sha: str) -> Any:
  """The weights of `exp.train.init_from` as host arrays shaped like `fresh` (arrays or
  ShapeDtypeStructs); they must fit exactly."""
  from lmjax import pretrained
  source = pretrained.load(exp.train.init_from)
  loaded = pretrained.to_layout(source.params, source.model, exp.model)
  params = pretrained.merge_params(fresh, loaded, exp.train.init_from)
  ignore = NON_ARCHITECTURE_FIELDS + ("scan_layers",)
  mine, theirs = dataclasses.asdict(exp.model), dataclasses.asdict(source.model)
  differ = sorted(k for k in mine if k not in ignore and mine[k] != theirs[k])
  if differ:
    raise UserError(f"--init_from {exp.train.init_from}: model.{', model.'.join(differ)} "
                    "differ from this experiment's")
  if source.tokenizer.sha256 != tokenizer_sha:
    raise UserError(f"--init_from {exp.train.init_from} uses another tokenizer than "
                    "data.tokenizer; point data.tokenizer at it")
  logging.info("initialised from %s", source.source)
  return params


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


def evaluate(eval_fn: Callable, params: Any, data: Any, exp: Experiment, put: Callable,
             objective: Objective) -> dict[str, float]:
  """The objective's held-out measures over a fixed prefix (or all) of the eval split."""
  n = data.num_eval_batches(exp.train.batch_size)
  n = min(n, exp.train.eval_batches) if exp.train.eval_batches else n
  base = jax.random.PRNGKey(exp.train.seed + 1)
  total, examples = None, []
  for i in range(n):
    batch = put(data.eval_batch(i, exp.train.batch_size, jax.process_index(),
                                jax.process_count()))
    out = eval_fn(params, batch, jax.random.fold_in(base, i))
    sums = {k: v for k, v in out.items() if v.ndim == 0}  # summed on device
    total = sums if total is None else jax.tree.map(jnp.add, total, sums)
    if len(sums) < len(out):  # per-example arrays, replicated: every process sees all
      examples.append(jax.device_get({k: v for k, v in out.items() if k not in sums}))
  gathered = {k: np.concatenate([e[k] for e in examples]) for k in examples[0]} \
      if examples else {}
  return objective.eval_metrics({k: float(v) for k, v in jax.device_get(total).items()},
                                gathered)


@dataclasses.dataclass
class Run:
  """Everything a training run holds besides its state."""

  exp: Experiment
  fns: StepFns
  mesh: jax.sharding.Mesh
  train_data: objectives.Dataset
  eval_data: objectives.Dataset
  ckpt: Checkpointer
  writer: MetricsWriter
  meta: dict[str, Any]  # written beside every checkpoint
  init_params: Any = None  # host arrays from train.init_from for a fresh state
  # After each evaluation: (step, eval metrics) -> stop now (a search's pruner). The run
  # then stops as on preemption: checkpoint written, eval metrics returned.
  on_eval: Callable[[int, dict[str, float]], bool] | None = None


def setup_run(exp: Experiment, workdir: str) -> Run:
  """Validates the experiment against tokenizer, devices and `init_from`, then builds the
  run's parts; nothing is written to `workdir` before every check has passed."""
  config = exp.to_dict()  # as given: `auto` stays auto for whoever loads the run later
  exp, workdir, tokenizer, mesh, (train_data, eval_data), fns, init_params = _checked_parts(
      exp, workdir)
  paths.check_access(workdir, write=True)
  tokenizer = install_tokenizer(exp.data.tokenizer, workdir)
  meta = {"config": config, "tokenizer_sha256": tokenizer.sha256,
          "lmjax_version": __version__, **auto_dtype_meta(config, exp)}
  t = exp.train
  return Run(exp, fns, mesh, train_data, eval_data,
             Checkpointer(workdir, t.keep_checkpoints, t.async_checkpoints),
             MetricsWriter(workdir, active=jax.process_index() == 0), meta, init_params)


def resolve_workdir(workdir: str) -> str:
  """The absolute path or bucket URL of a run directory, checked before anything is
  written: a file, a bad bucket or missing credentials give one line."""
  workdir = paths.resolve(workdir)
  paths.check_access(workdir, write=False)
  if paths.isfile(workdir):
    raise UserError(f"--workdir {workdir} is a file; give a directory (new or an earlier run's)")
  return workdir


def _checked_parts(exp: Experiment, workdir: str) -> tuple:
  """Every check a run makes before it writes anything, and the parts they produce (the
  experiment first, with `auto` dtype resolved)."""
  workdir = resolve_workdir(workdir)
  exp = resolve_auto_dtype(exp, workdir)
  t = exp.train
  tokenizer = install_tokenizer(exp.data.tokenizer, workdir, write=False)
  mesh = make_mesh(exp.mesh)
  check_experiment(exp, tokenizer.vocab_size, mesh.shape["data"] * mesh.shape["fsdp"])
  objective = objectives.build(exp.objective, tokenizer.special, exp.model.vocab_size)
  datasets = objective.datasets(exp.data, tokenizer, exp.model, t.seed)
  fns = StepFns(objective.build_model(exp.model, deterministic=exp.model.dropout_rate == 0),
                objective.build_model(exp.model, True),
                make_optimizer(exp.optimizer, t.steps, exp.model.width_mult),
                learning_rate_schedule(exp.optimizer, t.steps), objective,
                tokenizer.special, t.grad_accum_steps)
  init_params = None
  if t.init_from and not _has_checkpoints(workdir):
    abstract = jax.eval_shape(functools.partial(init_state, fns, t.seed, (1, exp.data.seq_len)))
    init_params = pretrained_params(exp, unbox(abstract.params), tokenizer.sha256)
  return exp, workdir, tokenizer, mesh, datasets, fns, init_params


AUTO_DTYPE_KEY = "cpu_auto_dtype"


def resolve_auto_dtype(exp: Experiment, workdir: str) -> Experiment:
  """`model.dtype=auto` on CPU, fixed for the run: measured once (process 0) when it
  starts, read back from its newest checkpoint when it resumes (`auto_dtype_meta` writes
  it beside each checkpoint), so a resume computes as the run did before."""
  if exp.model.dtype != "auto" or jax.default_backend() != "cpu":
    return exp  # TPU and GPU: `auto` is bfloat16, no measurement
  dtype = precision.run_dtype(_saved_dtype(workdir))
  logging.info("model.dtype=auto computes in %s on this CPU", dtype)
  return dataclasses.replace(exp, model=exp.model.replace(dtype=dtype))


def auto_dtype_meta(config: dict[str, Any], exp: Experiment) -> dict[str, str]:
  """The checkpoint metadata entry that remembers what `auto` resolved to on CPU."""
  if config["model"]["dtype"] == "auto" and exp.model.dtype != "auto":
    return {AUTO_DTYPE_KEY: exp.model.dtype}
  return {}


def _saved_dtype(workdir: str) -> str | None:
  """What `auto` computed in, from the newest readable checkpoint's metadata, if any."""
  folder = paths.join(workdir, "checkpoints")
  steps = sorted((int(n) for n in paths.listdir(folder) if n.isdigit()), reverse=True)
  for step in steps:
    try:
      meta = json.loads(paths.read_bytes(paths.join(folder, str(step), "meta", "metadata")))
      return meta.get(AUTO_DTYPE_KEY)
    except (OSError, ValueError, TypeError, AttributeError):
      continue  # a damaged step: restore_or_init sets it aside
  return None


def dry_run(exp: Experiment, workdir: str) -> None:
  """Every check of a real start, then the train step traced on abstract arrays (shapes
  and dtypes, no compilation, nothing written): a config that passes will start."""
  exp, _, _, mesh, (train_data, _), fns, _ = _checked_parts(exp, workdir)
  t = exp.train
  with jax.set_mesh(mesh), nn.logical_axis_rules(exp.mesh.rules):
    state = jax.eval_shape(lambda: unbox(init_state(fns, t.seed, (1, exp.data.seq_len))))
    batch = {k: jax.ShapeDtypeStruct((t.batch_size, *v.shape[1:]), v.dtype)
             for k, v in train_data.batch(0, 1).items()}
    jax.eval_shape(functools.partial(train_step, fns), state, batch)


def _has_checkpoints(workdir: str) -> bool:
  return any(name.isdigit() for name in paths.listdir(paths.join(workdir, "checkpoints")))


def train_and_evaluate(exp: Experiment, workdir: str,
                       on_eval: Callable[[int, dict[str, float]], bool] | None = None
                       ) -> dict[str, float]:
  """Trains (or resumes) in `workdir` until `exp.train.steps` (or until `on_eval` says
  stop); returns the final eval metrics."""
  run = setup_run(exp, workdir)
  run.on_eval = on_eval
  return run_training(run)


def run_training(run: Run) -> dict[str, float]:
  """The training loop on a built run (pretraining or a fine-tuning task), then closes its
  checkpointer and writers whatever happens."""
  try:
    with jax.set_mesh(run.mesh), nn.logical_axis_rules(run.exp.mesh.rules):
      return train_loop(run)
  finally:
    try:
      run.ckpt.close()  # also on errors: never leave a half-written save behind
    finally:
      run.writer.close()


def train_loop(run: Run) -> dict[str, float]:
  exp, t, rules = run.exp, run.exp.train, run.exp.mesh.rules
  abstract = jax.eval_shape(functools.partial(init_state, run.fns, t.seed, (1, exp.data.seq_len)))
  shardings = logical_to_shardings(abstract, run.mesh, rules)
  state = restore_or_init(run.fns, exp, run.ckpt, abstract, shardings,
                          run.meta["tokenizer_sha256"], run.init_params)
  n, i = jax.process_count(), jax.process_index()
  in_shardings = batch_shardings(run.mesh, rules, run.train_data.batch(0, n, i, n))
  train_fn, eval_fn = jit_steps(run.fns, shardings, in_shardings, replicated(run.mesh))
  put = lambda b: {k: jax.make_array_from_process_local_data(in_shardings[k], v)
                   for k, v in b.items()}
  host_batch = lambda s: run.train_data.batch(s, t.batch_size, jax.process_index(),
                                              jax.process_count())
  step = int(jax.device_get(state.step))
  logging.info("%s: %.1fM parameters; steps %d..%d on %d device(s), mesh %s", exp.model.family,
               count_params(state.params) / 1e6, step, t.steps, jax.device_count(),
               dict(run.mesh.shape))
  seq = exp.data.seq_len
  speed = Throughput(t.batch_size * seq,
                     flops_per_token(exp.model, seq, exp.objective.predictions(seq)),
                     peak_flops(t.peak_flops_per_device) * jax.device_count(), t.steps)
  profiler = StepProfiler(t.profile_steps, t.steps,
                          paths.join(paths.dirname(run.ckpt.directory), "tensorboard"))
  pending: list[Metrics] = []  # fetched from the device only at log steps
  skips = 0  # consecutive skipped (non-finite) steps
  eval_metrics: dict[str, float] = {}
  pruned = False
  with concurrent.futures.ThreadPoolExecutor(1) as pool, PreemptionWatch() as preemption:
    upcoming = pool.submit(host_batch, step)  # the next host batch is built during the step
    while step < t.steps:
      batch = put(upcoming.result())
      if step + 1 < t.steps:
        upcoming = pool.submit(host_batch, step + 1)
      profiler.before(step + 1)
      with jax.profiler.StepTraceAnnotation("train", step_num=step + 1):
        state, metrics = train_fn(state, batch)
      step += 1
      profiler.after(step, metrics)
      pending.append(metrics)
      if not speed.started:  # keep compilation out of the throughput
        jax.block_until_ready(metrics)
        logging.info("first step (with compilation) took %.1fs", speed.restart(step))
      if step % t.log_every == 0 or step == t.steps:
        fetched = jax.device_get(pending)
        skips = check_skips(fetched, step, skips, t.max_consecutive_skips)
        values = {k: float(np.mean([v[k] for v in fetched])) for k in fetched[0]
                  if k != "tokens"}
        values["skipped"] = float(sum(v["skipped"] for v in fetched))
        run.writer.write(step, "train", {**values, **speed.measure(step)}, t.steps)
        pending = []
      if (t.eval_every and step % t.eval_every == 0) or step == t.steps:
        eval_metrics = evaluate(eval_fn, state.params, run.eval_data, exp, put, run.fns.objective)
        run.writer.write(step, "eval", eval_metrics, t.steps)
        speed.restart(step)  # keep evaluation out of the training rate
        pruned = pruned or (run.on_eval is not None and _agreed(run.on_eval(step, eval_metrics)))
      if t.lm_eval_tasks and ((t.lm_eval_every and step % t.lm_eval_every == 0) or
                              step == t.steps):
        from lmjax import harness
        tokenizer = paths.join(paths.dirname(run.ckpt.directory), "tokenizer.model")
        run.writer.write(step, "lm_eval", harness.training_metrics(exp, state.params, tokenizer),
                         t.steps)
        speed.restart(step)
      stop = preemption.requested(step) or pruned
      if step % t.checkpoint_every == 0 or step == t.steps or stop:
        run.ckpt.save(step, state, {**run.meta, "step": step})
      if stop:
        run.ckpt.wait()
        logging.warning("%s: checkpoint of step %d is saved; exiting",
                        "pruned" if pruned else "preempted", step)
        return eval_metrics
  if not eval_metrics:  # nothing left to train: report the checkpoint as it is
    logging.info("workdir already at step %d of %d; nothing to train", step, t.steps)
    eval_metrics = evaluate(eval_fn, state.params, run.eval_data, exp, put, run.fns.objective)
  return eval_metrics


class StepProfiler:
  """A jax.profiler trace of steps [first, last] (`train.profile_steps`) into `folder`,
  where TensorBoard's profile plugin finds it; does nothing when `steps` is empty."""

  def __init__(self, steps: tuple[int, ...], total: int, folder: str):
    self.first, self.last = (steps[0], min(steps[1], total)) if steps else (0, -1)
    self.folder = folder
    self._local = folder  # a bucket's trace is written locally, then uploaded

  def before(self, step: int) -> None:
    if step == self.first:
      self._local = paths.local_staging(self.folder)
      jax.profiler.start_trace(self._local)

  def after(self, step: int, metrics: Any) -> None:
    if step == self.last:
      jax.block_until_ready(metrics)  # the traced steps' device work, in full
      jax.profiler.stop_trace()
      if self._local != self.folder:
        paths.put_tree(self._local, self.folder)
        paths.remove_local_staging(self._local, self.folder)
      logging.info("profiled steps %d..%d into %s", self.first, step, self.folder)


def _agreed(stop: bool) -> bool:
  """Process 0's decision, for every process (each asks its own `on_eval`; only process 0's
  answer counts, so all stop at the same step)."""
  if jax.process_count() == 1:
    return bool(stop)
  from jax.experimental import multihost_utils
  return bool(multihost_utils.broadcast_one_to_all(np.bool_(stop)))


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


def count_params(params: Any) -> int:
  return sum(int(x.size) for x in jax.tree.leaves(params))
