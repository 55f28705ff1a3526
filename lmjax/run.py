"""Assembling a run: one builder for every objective and every command.

`assemble(exp, workdir)` makes every check a run makes before it writes anything
(workdir, tokenizer, devices, data, weights to start from) and returns the parts;
`build_run` adds the writers (checkpoints, metrics), `dry_run` traces one step on
abstract arrays, and `lmjax.aot` compiles the same step for a TPU topology.
`launch.train`, `launch.finetune`, `launch.compile` and `launch.sweep`'s trials all
come through here.

A fine-tuning objective (`Objective.fine_tunes`: sft, dpo, grpo, classification,
regression, qa) starts from `train.init_from`, which decides the architecture and
the tokenizer; the experiment's model section then sets only how the model
computes (`COMPUTE_FIELDS`: attention, remat, dropout, and the dtype unless it is
`auto`, which keeps the source's own: a Hugging Face config's). A pretraining
objective trains the experiment's own architecture, from scratch or from
`train.init_from` weights of the same shape.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
from absl import logging

from lmjax import __version__, cooldown, cpu_dtype, objectives, paths, pretrained
from lmjax.checkpoint import Checkpointer
from lmjax.data.tokenizer import Tokenizer
from lmjax.data.tokenizer_io import install_tokenizer, save_tokenizer
from lmjax.errors import UserError
from lmjax.experiment import COMPUTE_FIELDS, Experiment
from lmjax.metrics import MetricsWriter
from lmjax.loop import default_hooks, train_loop
from lmjax.lora import runs as lora_runs
from lmjax.sharding import check_expert_axis, data_parallel_size, make_mesh, unbox
from lmjax.steps import StepFns, init_state, step_fns, train_step

AUTO_DTYPE_KEY = "cpu_auto_dtype"  # checkpoint metadata: what `auto` resolved to on CPU


@dataclasses.dataclass
class RunParts:
  """A checked run before anything is written: what `build_run`, `dry_run` and
  `lmjax.aot` share."""

  exp: Experiment  # architecture settled, `auto` dtype resolved on CPU
  config: dict[str, Any]  # the experiment as given (`auto` stays auto), kept in checkpoints
  workdir: str | None
  tokenizer: Any
  mesh: jax.sharding.Mesh
  fns: StepFns
  train_data: objectives.Dataset
  eval_data: objectives.Dataset
  source: pretrained.Pretrained | None = None  # train.init_from, loaded
  init_params: Any = None  # host arrays for a fresh state (new heads left abstract)
  base_id: dict[str, str] | None = None  # LoRA: the frozen base's path and sha256


@dataclasses.dataclass
class TrainingRun(RunParts):
  """A run ready for the loop: its parts and its writers."""

  ckpt: Checkpointer | None = None
  writer: MetricsWriter | None = None
  meta: dict[str, Any] = dataclasses.field(default_factory=dict)  # beside every checkpoint


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
                    f"data-parallel size {data_parallel} (the mesh axes of the batch: "
                    "data x fsdp x expert)")
  if t.lm_eval_tasks and (m.family != "decoder" or jax.process_count() > 1):
    raise UserError("train.lm_eval_tasks scores decoders in one-process runs; evaluate "
                    "checkpoints of this run with `python -m launch.lm_eval`")


def resolve_workdir(workdir: str) -> str:
  """The absolute path or bucket URL of a run directory, checked before anything is
  written: a file, a bad bucket or missing credentials give one line."""
  workdir = paths.resolve(workdir)
  paths.check_access(workdir, write=False)
  if paths.isfile(workdir):
    raise UserError(f"--workdir {workdir} is a file; give a directory (new or an earlier run's)")
  return workdir


def _source(exp: Experiment) -> pretrained.Pretrained | None:
  """`train.init_from`, loaded, if the experiment names one (a fine-tuning objective must)."""
  t, fine_tunes = exp.train, objectives.objective_class(exp.objective.kind).fine_tunes
  if not t.init_from:
    if fine_tunes:
      raise UserError(f"objective.kind={exp.objective.kind} fine-tunes a pretrained model: "
                      "give --init_from (an lmjax run or a Hugging Face directory)")
    return None
  if not paths.isdir(t.init_from):
    raise UserError(f"train.init_from={t.init_from} is not a directory (an lmjax run or a "
                    "Hugging Face model directory)")
  return pretrained.load(t.init_from)


def settle(exp: Experiment, source: pretrained.Pretrained | None = None
           ) -> tuple[Experiment, pretrained.Pretrained | None]:
  """The experiment with its architecture settled, and `train.init_from` loaded (`source`
  if given): a fine-tuning run's model is the source's architecture, computed as the
  experiment says."""
  source = source or _source(exp)
  if source is None or not objectives.objective_class(exp.objective.kind).fine_tunes:
    return exp, source
  compute = {k: getattr(exp.model, k) for k in COMPUTE_FIELDS}
  if compute["dtype"] == "auto":  # the source's own: a Hugging Face config's, a run's
    compute["dtype"] = source.model.dtype
  return dataclasses.replace(exp, model=source.model.replace(**compute)), source


def assemble(exp: Experiment, workdir: str | None, devices: Sequence[Any] | None = None,
             compile_only: bool = False, source: pretrained.Pretrained | None = None
             ) -> RunParts:
  """Every check a run makes before it writes anything, and the parts they produce.
  `compile_only` (ahead-of-time compilation, `workdir=None`): no data is read (the step
  is compiled for the objective's `batch_spec`) and no initial weights are merged.
  `source`: `train.init_from` already loaded."""
  workdir = resolve_workdir(workdir) if workdir else None
  exp, source = settle(exp, source)
  exp = lora_runs.settle(exp, source)  # lora.init_from decides the adapters' shape
  config = exp.to_dict()  # as given: `auto` stays auto for whoever loads the run later
  exp = resolve_auto_dtype(exp, workdir)
  fine_tunes = objectives.objective_class(exp.objective.kind).fine_tunes
  if fine_tunes:
    tokenizer = source.tokenizer
  elif workdir:
    tokenizer = install_tokenizer(exp.data.tokenizer, workdir, write=False)
  else:
    tokenizer = Tokenizer(exp.data.tokenizer)
  mesh = make_mesh(exp.mesh, devices)
  check_expert_axis(exp.model.moe.num_experts, mesh, exp.mesh.rules)
  check_experiment(exp, tokenizer.vocab_size, data_parallel_size(mesh, exp.mesh.rules))
  t = exp.train
  objective = objectives.build(exp.objective, tokenizer.special, exp.model.vocab_size, exp.task)
  data = (None, None) if compile_only else objective.datasets(exp.data, tokenizer, exp.model,
                                                              t.seed)
  check_lora(exp)
  fns = step_fns(exp.model, objective, exp.optimizer, t.steps, t.grad_accum_steps, exp.lora,
                 exp.data.seq_len)
  parts = RunParts(exp, config, workdir, tokenizer, mesh, fns, *data, source)
  if t.branch_from and not compile_only and not has_checkpoints(workdir):
    cooldown.source_meta(exp)  # the branch's checks, before anything is written
  if exp.lora.active:
    parts.base_id = {**lora_runs.base_identity(source),
                     "quantized": lora_runs.quantized_layers(fns.lora)}
  if source is not None and not compile_only and (fine_tunes or exp.lora.active
                                                  or not has_checkpoints(workdir)):
    parts.init_params = initial_params(parts, tokenizer.sha256)
  return parts


def check_lora(exp: Experiment) -> None:
  if not exp.lora.active:
    return
  if not exp.train.init_from:
    raise UserError("lora trains adapters on a frozen base: give train.init_from (an lmjax "
                    "run or a Hugging Face directory)")
  if exp.train.init != "pretrained":
    raise UserError("lora needs the base's weights: train.init=random leaves nothing frozen "
                    "worth adapting")


def initial_params(parts: RunParts, tokenizer_sha: str) -> Any:
  """`train.init_from`'s weights as host arrays shaped like this run's parameters; a
  fine-tuning objective's new head stays abstract (it keeps its fresh values)."""
  exp, source = parts.exp, parts.source
  objective = parts.fns.objective
  abstract = jax.eval_shape(functools.partial(init_state, parts.fns, exp.train.seed,
                                              (1, exp.data.seq_len))).params
  if parts.fns.lora is not None:  # the float base without adapters; they are added below
    dummy = jax.ShapeDtypeStruct((1, exp.data.seq_len), jax.numpy.int32)
    abstract = jax.eval_shape(parts.fns.eval_model.init, jax.random.PRNGKey(0), dummy,
                              dummy)["params"]
  loaded = pretrained.to_layout(source.params, source.model, exp.model)
  params = pretrained.merge_params(unbox(abstract), loaded, exp.train.init_from,
                                   may_be_new=objective.is_new_param)
  if parts.fns.lora is not None:
    params = lora_runs.initial(parts.fns.lora, params, exp.train.seed, source, exp.model)
  if not objective.fine_tunes:  # a pretraining run's own architecture must be the source's
    ignore = COMPUTE_FIELDS + ("scan_layers",)
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


def build_run(exp: Experiment, workdir: str) -> TrainingRun:
  """A run ready to train: every check first, then what loading the run later needs
  (tokenizer, chat template) and its checkpoint and metrics writers."""
  parts = assemble(exp, workdir)
  exp, objective = parts.exp, parts.fns.objective
  if parts.source is not None and objective.fine_tunes:  # DPO's reference log-probabilities
    reference = parts.init_params  # LoRA: the base, adapters off (no second copy)
    if parts.fns.lora is not None:
      reference = lora_runs.without_adapters(reference)
    objective.precompute((parts.train_data, parts.eval_data), parts.fns.eval_model, reference)
  if exp.train.init != "pretrained":  # the same architecture, fresh weights (a baseline)
    parts.init_params = None
  paths.check_access(parts.workdir, write=True)
  if jax.process_index() == 0:
    paths.makedirs(parts.workdir)
    if objective.fine_tunes:
      save_tokenizer(parts.tokenizer, parts.workdir)
    for name, text in objective.run_files().items():
      paths.write_atomic(paths.join(parts.workdir, name), text)
  if not objective.fine_tunes:
    install_tokenizer(exp.data.tokenizer, parts.workdir)
  meta = {"config": parts.config, "tokenizer_sha256": parts.tokenizer.sha256,
          "lmjax_version": __version__, "labels": list(objective.label_names()),
          **auto_dtype_meta(parts.config, exp)}
  if parts.base_id is not None:
    meta[lora_runs.BASE_KEY] = parts.base_id
  t = exp.train
  return TrainingRun(**vars(parts),
                     ckpt=Checkpointer(parts.workdir, t.keep_checkpoints, t.async_checkpoints),
                     writer=MetricsWriter(parts.workdir, active=jax.process_index() == 0),
                     meta=meta)


def dry_run(exp: Experiment, workdir: str) -> None:
  """Every check of a real start, then the train step traced on abstract arrays (shapes
  and dtypes, no compilation, nothing written): a config that passes will start."""
  parts = assemble(exp, workdir)
  exp, t = parts.exp, parts.exp.train
  with jax.set_mesh(parts.mesh), nn.logical_axis_rules(exp.mesh.rules):
    state = jax.eval_shape(lambda: unbox(init_state(parts.fns, t.seed, (1, exp.data.seq_len))))
    jax.eval_shape(functools.partial(train_step, parts.fns), state, abstract_batch(parts))


def abstract_batch(parts: RunParts, shardings: dict[str, Any] | None = None
                   ) -> dict[str, jax.ShapeDtypeStruct]:
  """The global train batch's shapes and dtypes, from the objective's `batch_spec`."""
  rows, spec = parts.exp.train.batch_size, parts.fns.objective.batch_spec(parts.exp.data.seq_len)
  return {k: jax.ShapeDtypeStruct((rows, *shape), dtype,
                                  sharding=shardings[k] if shardings else None)
          for k, (shape, dtype) in spec.items()}


# ------------------------------------------------------------------------- `auto` dtype


def has_checkpoints(workdir: str | None) -> bool:
  return workdir is not None and any(name.isdigit() for name in paths.listdir(paths.join(workdir, "checkpoints")))


def resolve_auto_dtype(exp: Experiment, workdir: str | None) -> Experiment:
  """`model.dtype=auto` on CPU, fixed for the run: decided once (process 0) when it
  starts, read back from its newest checkpoint when it resumes (`auto_dtype_meta` writes
  it beside each checkpoint), so a resume computes as the run did before."""
  if exp.model.dtype != "auto" or jax.default_backend() != "cpu":
    return exp  # TPU and GPU: `auto` is bfloat16
  dtype = cpu_dtype.run_dtype(_saved_dtype(workdir))
  logging.info("model.dtype=auto computes in %s on this CPU", dtype)
  return dataclasses.replace(exp, model=exp.model.replace(dtype=dtype))


def auto_dtype_meta(config: dict[str, Any], exp: Experiment) -> dict[str, str]:
  """The checkpoint metadata entry that remembers what `auto` resolved to on CPU."""
  if config["model"]["dtype"] == "auto" and exp.model.dtype != "auto":
    return {AUTO_DTYPE_KEY: exp.model.dtype}
  return {}


def _saved_dtype(workdir: str | None) -> str | None:
  """What `auto` computed in, from the newest readable checkpoint's metadata, if any."""
  if not has_checkpoints(workdir):
    return None
  ckpt = Checkpointer(workdir, read_only=True)
  try:
    for step in sorted(ckpt.all_steps(), reverse=True):
      try:
        return ckpt.read_meta(step).get(AUTO_DTYPE_KEY)
      except Exception:  # noqa: BLE001  (a damaged step: restore_or_init sets it aside)
        continue
  finally:
    ckpt.close()
  return None


# ----------------------------------------------------------------------------- training


def train_and_evaluate(exp: Experiment, workdir: str,
                       should_stop: Callable[[int, dict[str, float]], bool] | None = None,
                       hooks: Sequence[Any] = ()) -> dict[str, float]:
  """Trains (or resumes) in `workdir` until `exp.train.steps`, or until a hook stops it
  (`should_stop(step, eval_metrics)`: a search's pruner); returns the final eval metrics.
  The objective's outputs and WORKDIR/results.json are written at the end."""
  run = build_run(exp, workdir)
  try:
    with jax.set_mesh(run.mesh), nn.logical_axis_rules(run.exp.mesh.rules):
      metrics = train_loop(run, [*default_hooks(run, should_stop), *hooks])
  finally:
    try:
      run.ckpt.close()  # also on errors: never leave a half-written save behind
    finally:
      run.writer.close()
  write_results(run, metrics)
  return metrics


def write_results(run: TrainingRun, metrics: dict[str, float]) -> dict[str, Any]:
  """WORKDIR/results.json (the held-out measures and where the run started) and the
  objective's own outputs (QA's predictions)."""
  t = run.exp.train
  result = {**metrics, "steps": t.steps, "objective": run.exp.objective.kind,
            "init_from": t.init_from, "init": t.init, "labels": run.meta["labels"]}
  if jax.process_index() == 0:
    for name, text in run.fns.objective.run_outputs().items():
      paths.write_atomic(paths.join(run.workdir, name), text)
    paths.write_atomic(paths.join(run.workdir, "results.json"), json.dumps(result, indent=2))
  return result
