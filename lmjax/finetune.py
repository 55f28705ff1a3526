"""Fine-tuning a pretrained backbone: classification or regression of a text or a text pair
(GLUE-style), and extractive QA, on the one sharded training loop of pretraining.

A task is another objective of `lmjax.train`: its head and loss plug into the
same jitted `train_step` (mesh, FSDP, gradient accumulation, non-finite skip),
the same checkpointing, preemption save and exact resume. The architecture and
tokenizer come from `init_from` (an lmjax run or a Hugging Face directory);
`train.init="random"` keeps the architecture but not the weights, the baseline
a pretrained start must beat. Held-out measures land in WORKDIR/results.json.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from typing import Any, Mapping

import flax.linen as nn
import jax

from lmjax import __version__, objectives, paths, pretrained
from lmjax.checkpoint import Checkpointer
from lmjax.data import tokenizer_io
from lmjax.data.pipeline import DataConfig
from lmjax.distributed import RuntimeConfig
from lmjax.errors import UserError
from lmjax.experiment import Experiment, TrainConfig, section_from_dict
from lmjax.metrics import MetricsWriter
from lmjax.objectives import DPOOptions, TaskConfig
from lmjax.optim import OptimizerConfig, learning_rate_schedule, make_optimizer
from lmjax.sharding import MeshConfig, check_rules, make_mesh, unbox


@dataclasses.dataclass(frozen=True)
class FinetuneTrainConfig(TrainConfig):
  """Pretraining's train section, with fine-tuning defaults and where the weights start."""

  steps: int = 300
  log_every: int = 20
  eval_batches: int = 0  # every held-out example
  checkpoint_every: int = 100
  init: str = "pretrained"  # pretrained | random (same architecture, fresh weights)

  def __post_init__(self):
    super().__post_init__()
    if self.init not in ("pretrained", "random"):
      raise ValueError(f"train.init must be 'pretrained' or 'random', got {self.init!r}")


@dataclasses.dataclass(frozen=True)
class FinetuneExperiment:
  task: TaskConfig
  optimizer: OptimizerConfig
  train: FinetuneTrainConfig
  mesh: MeshConfig = MeshConfig()
  runtime: RuntimeConfig = RuntimeConfig()
  dpo: DPOOptions = DPOOptions()

  def to_dict(self) -> dict[str, Any]:
    return json.loads(json.dumps(dataclasses.asdict(self)))


_SECTIONS = {"task": TaskConfig, "optimizer": OptimizerConfig, "train": FinetuneTrainConfig,
             "mesh": MeshConfig, "runtime": RuntimeConfig, "dpo": DPOOptions}


def finetune_from_dict(config: Mapping[str, Any]) -> FinetuneExperiment:
  unknown = sorted(set(config) - set(_SECTIONS))
  if unknown:
    raise UserError(f"unknown config section(s) {', '.join(unknown)} (known: {', '.join(_SECTIONS)})")
  sections = {n: section_from_dict(n, c, config.get(n, {})) for n, c in _SECTIONS.items()}
  sections["mesh"] = dataclasses.replace(sections["mesh"], rules=check_rules(sections["mesh"].rules))
  return FinetuneExperiment(**sections)


def default_finetune_config() -> dict[str, Any]:
  return {name: dataclasses.asdict(cls()) for name, cls in _SECTIONS.items()}


# ----------------------------------------------------------------------------- the run


def objective_config(exp: FinetuneExperiment) -> objectives.ObjectiveConfig:
  """The task's objective with its options (from the section the objective names)."""
  cls = objectives.objective_class(exp.task.kind)
  options = dataclasses.asdict(getattr(exp, cls.options_section)) if cls.options_section else {}
  try:
    return cls.config_class(kind=exp.task.kind, **options)
  except ValueError as e:
    raise UserError(str(e)) from None


def build_run(exp: FinetuneExperiment, init_from: str, workdir: str, dry: bool = False):
  """A `train.Run` of the task: every check first, then the writers (nothing is written to
  `workdir` before the data, weights and mesh are known to fit). `dry`: the checks and
  one abstractly traced step only."""
  from lmjax import train as train_lib
  if not init_from:
    raise UserError("--init_from is required: the run or Hugging Face directory to start from")
  workdir = train_lib.resolve_workdir(workdir)
  t = exp.train
  source = pretrained.load(init_from)
  if exp.task.seq_len > source.model.max_len:
    raise UserError(f"task.seq_len={exp.task.seq_len} exceeds the model's "
                    f"max_len={source.model.max_len}")
  model_cfg = source.model.replace(dropout_rate=exp.task.dropout_rate)
  run_exp = Experiment(model=model_cfg, data=DataConfig(seq_len=exp.task.seq_len),
                       objective=objective_config(exp), optimizer=exp.optimizer, train=t,
                       mesh=exp.mesh, runtime=exp.runtime)
  config = run_exp.to_dict()
  run_exp = train_lib.resolve_auto_dtype(run_exp, workdir)
  objective = objectives.build(run_exp.objective, source.tokenizer.special,
                               run_exp.model.vocab_size, exp.task)
  train_data, eval_data = objective.datasets(run_exp.data, source.tokenizer, run_exp.model, t.seed)
  mesh = make_mesh(exp.mesh)
  train_lib.check_experiment(run_exp, 0, mesh.shape["data"] * mesh.shape["fsdp"])
  fns = train_lib.StepFns(objective.build_model(run_exp.model, exp.task.dropout_rate == 0),
                          objective.build_model(run_exp.model, True),
                          make_optimizer(exp.optimizer, t.steps, run_exp.model.width_mult),
                          learning_rate_schedule(exp.optimizer, t.steps), objective,
                          source.tokenizer.special, t.grad_accum_steps)
  labels = objective.label_names()
  abstract = jax.eval_shape(functools.partial(train_lib.init_state, fns, t.seed,
                                              (1, exp.task.seq_len)))
  initial = pretrained.merge_params(unbox(abstract.params), source.params, init_from,
                                    may_be_new=objective.is_new_param)  # host arrays
  init_params = initial if t.init == "pretrained" else None
  if not dry:  # e.g. DPO's reference log-probabilities, from the weights the run starts at
    objective.precompute((train_data, eval_data), fns.eval_model, initial)
  meta = {"config": config, "task": exp.to_dict()["task"], "init_from": init_from,
          "labels": list(labels), "tokenizer_sha256": source.tokenizer.sha256,
          "lmjax_version": __version__, **train_lib.auto_dtype_meta(config, run_exp)}
  if dry:  # trace one step on abstract arrays: shapes and dtypes only, nothing written
    with jax.set_mesh(mesh), nn.logical_axis_rules(exp.mesh.rules):
      state = jax.eval_shape(lambda: unbox(
          train_lib.init_state(fns, t.seed, (1, exp.task.seq_len))))
      batch = {k: jax.ShapeDtypeStruct((t.batch_size, *v.shape[1:]), v.dtype)
               for k, v in train_data.batch(0, 1).items()}
      jax.eval_shape(functools.partial(train_lib.train_step, fns), state, batch)
    return None
  paths.check_access(workdir, write=True)
  if jax.process_index() == 0:  # what loading the run later needs beside its checkpoints
    paths.makedirs(workdir)
    tokenizer_io.save_tokenizer(source.tokenizer, workdir)
    for name, text in objective.run_files().items():
      paths.write_atomic(paths.join(workdir, name), text)
  return train_lib.Run(run_exp, fns, mesh, train_data, eval_data,
                       Checkpointer(workdir, t.keep_checkpoints, t.async_checkpoints),
                       MetricsWriter(workdir, active=jax.process_index() == 0), meta,
                       init_params)


def finetune(exp: FinetuneExperiment, init_from: str, workdir: str) -> dict[str, Any]:
  """Trains the task head (and backbone) in `workdir` through the pretraining loop, or
  resumes it; writes and returns the held-out measures."""
  from lmjax import train as train_lib
  run = build_run(exp, init_from, workdir)
  metrics = train_lib.run_training(run)
  result = {**metrics, "steps": exp.train.steps, "init": exp.train.init, "init_from": init_from,
            "task": exp.task.kind, "labels": run.meta["labels"]}
  if jax.process_index() == 0:
    workdir = paths.dirname(run.ckpt.directory)
    for name, text in run.fns.objective.run_outputs().items():
      paths.write_atomic(paths.join(workdir, name), text)
    paths.write_atomic(paths.join(workdir, "results.json"), json.dumps(result, indent=2))
  return result
