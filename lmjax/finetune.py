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
import numpy as np

from lmjax import __version__, paths, pretrained
from lmjax.checkpoint import Checkpointer
from lmjax.data import genres, tasks
from lmjax.data.permutation import permute, round_keys
from lmjax.data.pipeline import DataConfig
from lmjax.distributed import RuntimeConfig
from lmjax.errors import UserError
from lmjax.experiment import Experiment, TrainConfig, section_from_dict
from lmjax.metrics import MetricsWriter
from lmjax.model import SequenceClassifier, SpanExtractor, TransformerConfig
from lmjax.objectives import TASKS, ObjectiveConfig
from lmjax.optim import OptimizerConfig, learning_rate_schedule, make_optimizer
from lmjax.sharding import MeshConfig, check_rules, make_mesh


@dataclasses.dataclass(frozen=True)
class TaskConfig:
  kind: str = "classification"  # classification | regression | qa
  dataset: str = ""  # built-in dataset ("shakespeare_genre"), else train_file/eval_file
  train_file: str = ""  # JSON lines, see lmjax/data/tasks.py
  eval_file: str = ""
  labels: tuple[str, ...] = ()  # class names (classification)
  seq_len: int = 128
  dropout_rate: float = 0.1

  def __post_init__(self):
    if self.kind not in TASKS:
      raise ValueError(f"task.kind must be one of {', '.join(TASKS)}, got {self.kind!r}")
    if self.dataset not in ("", "shakespeare_genre"):
      raise ValueError(f"task.dataset {self.dataset!r} is unknown (known: shakespeare_genre)")
    if self.seq_len < 4:
      raise ValueError(f"task.seq_len must be at least 4, got {self.seq_len}")
    if not 0 <= self.dropout_rate < 1:
      raise ValueError(f"task.dropout_rate must be in [0, 1), got {self.dropout_rate}")


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

  def to_dict(self) -> dict[str, Any]:
    return json.loads(json.dumps(dataclasses.asdict(self)))


_SECTIONS = {"task": TaskConfig, "optimizer": OptimizerConfig, "train": FinetuneTrainConfig,
             "mesh": MeshConfig, "runtime": RuntimeConfig}


def finetune_from_dict(config: Mapping[str, Any]) -> FinetuneExperiment:
  unknown = sorted(set(config) - set(_SECTIONS))
  if unknown:
    raise UserError(f"unknown config section(s) {', '.join(unknown)} (known: {', '.join(_SECTIONS)})")
  sections = {n: section_from_dict(n, c, config.get(n, {})) for n, c in _SECTIONS.items()}
  sections["mesh"] = dataclasses.replace(sections["mesh"], rules=check_rules(sections["mesh"].rules))
  return FinetuneExperiment(**sections)


def default_finetune_config() -> dict[str, Any]:
  return {name: dataclasses.asdict(cls()) for name, cls in _SECTIONS.items()}


# ----------------------------------------------------------------------------- data


def load_task_data(task: TaskConfig, source: pretrained.Pretrained
                   ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], tuple[str, ...]]:
  """(train arrays, eval arrays, label names) encoded with the source's tokenizer."""
  if task.seq_len > source.model.max_len:
    raise UserError(f"task.seq_len={task.seq_len} exceeds the model's max_len={source.model.max_len}")
  family, tok = source.model.family, source.tokenizer
  if task.kind == "qa":
    if not (task.train_file and task.eval_file):
      raise UserError("a QA task needs task.train_file and task.eval_file")
    read = lambda p: tasks.encode_qa(tok, tasks.read_qa(p), task.seq_len, family)
    return read(task.train_file), read(task.eval_file), ()
  regression = task.kind == "regression"
  if task.dataset == "shakespeare_genre":
    labels = genres.LABELS
    train, held_out = ([(p, None, label) for p, label in genres.genre_examples(split)]
                       for split in ("train", "eval"))
  elif task.train_file and task.eval_file and (task.labels or regression):
    labels = () if regression else task.labels
    train, held_out = (tasks.read_labelled(p, labels, regression)
                       for p in (task.train_file, task.eval_file))
  else:
    raise UserError("set task.dataset, or task.train_file and task.eval_file (and task.labels "
                    "for classification)")
  encode = lambda ex: tasks.encode_labelled(tok, ex, task.seq_len, family, regression)
  return encode(train), encode(held_out), tuple(labels)


class TaskDataset:
  """Labelled examples as batches of a pure function of (seed, step), like PackedDataset:
  each epoch a keyed permutation of the examples; eval batches in order, padded with
  weight-0 rows."""

  def __init__(self, arrays: dict[str, np.ndarray], seed: int):
    self.arrays, self.seed = arrays, seed
    self.num_examples = len(next(iter(arrays.values())))

  def _rows(self, ids: np.ndarray) -> dict[str, np.ndarray]:
    valid = ids >= 0
    out = {k: v[np.where(valid, ids, 0)] for k, v in self.arrays.items()}
    out["weights"] = valid.astype(np.float32)
    return out

  def batch(self, step: int, global_batch: int, process_index: int = 0,
            process_count: int = 1) -> dict[str, np.ndarray]:
    per = global_batch // process_count
    flat = np.arange(step * global_batch + process_index * per,
                     step * global_batch + (process_index + 1) * per)
    epochs, offsets = np.divmod(flat, self.num_examples)
    ids = np.empty(per, np.int64)
    for epoch in np.unique(epochs):
      sel = epochs == epoch
      ids[sel] = permute(offsets[sel], self.num_examples, round_keys([self.seed, int(epoch)]))
    return self._rows(ids)

  def eval_batch(self, index: int, global_batch: int, process_index: int = 0,
                 process_count: int = 1) -> dict[str, np.ndarray]:
    per = global_batch // process_count
    ids = np.arange(index * global_batch + process_index * per,
                    index * global_batch + (process_index + 1) * per)
    return self._rows(np.where(ids < self.num_examples, ids, -1))

  def num_eval_batches(self, global_batch: int) -> int:
    return -(-self.num_examples // global_batch)


# ----------------------------------------------------------------------------- the run


def task_model(exp: FinetuneExperiment, cfg: TransformerConfig, num_labels: int,
               deterministic: bool):
  """The task's head on a backbone configured by `cfg` (the source's, as the run has it)."""
  if exp.task.kind == "qa":
    return SpanExtractor(cfg, deterministic)
  return SequenceClassifier(cfg, 1 if exp.task.kind == "regression" else num_labels,
                            deterministic)


def _head(name: str) -> bool:
  return name.startswith(("classifier/", "span/"))


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
  train_arrays, eval_arrays, labels = load_task_data(exp.task, source)
  model_cfg = source.model.replace(dropout_rate=exp.task.dropout_rate)
  run_exp = Experiment(model=model_cfg, data=DataConfig(seq_len=exp.task.seq_len),
                       objective=ObjectiveConfig(kind=exp.task.kind), optimizer=exp.optimizer,
                       train=t, mesh=exp.mesh, runtime=exp.runtime)
  config = run_exp.to_dict()
  run_exp = train_lib.resolve_auto_dtype(run_exp, workdir)
  mesh = make_mesh(exp.mesh)
  train_lib.check_experiment(run_exp, 0, mesh.shape["data"] * mesh.shape["fsdp"])
  fns = train_lib.StepFns(task_model(exp, run_exp.model, len(labels), exp.task.dropout_rate == 0),
                          task_model(exp, run_exp.model, len(labels), True),
                          make_optimizer(exp.optimizer, t.steps),
                          learning_rate_schedule(exp.optimizer, t.steps), run_exp.objective,
                          source.tokenizer.special, t.grad_accum_steps)
  init_params = None
  if t.init == "pretrained":
    abstract = jax.eval_shape(functools.partial(train_lib.init_state, fns, t.seed,
                                                (1, exp.task.seq_len)))
    init_params = pretrained.merge_params(train_lib.unbox(abstract.params), source.params,
                                          init_from, may_be_new=_head)
  meta = {"config": config, "task": exp.to_dict()["task"], "init_from": init_from,
          "labels": list(labels), "tokenizer_sha256": source.tokenizer.sha256,
          "lmjax_version": __version__, **train_lib.auto_dtype_meta(config, run_exp)}
  train_data = TaskDataset(train_arrays, t.seed)
  if dry:  # trace one step on abstract arrays: shapes and dtypes only, nothing written
    with jax.set_mesh(mesh), nn.logical_axis_rules(exp.mesh.rules):
      state = jax.eval_shape(lambda: train_lib.unbox(
          train_lib.init_state(fns, t.seed, (1, exp.task.seq_len))))
      batch = {k: jax.ShapeDtypeStruct((t.batch_size, *v.shape[1:]), v.dtype)
               for k, v in train_data.batch(0, 1).items()}
      jax.eval_shape(functools.partial(train_lib.train_step, fns), state, batch)
    return None
  paths.check_access(workdir, write=True)
  return train_lib.Run(run_exp, fns, mesh, train_data, TaskDataset(eval_arrays, t.seed),
                       Checkpointer(workdir, t.keep_checkpoints, t.async_checkpoints),
                       MetricsWriter(workdir, active=jax.process_index() == 0), meta,
                       init_params, num_labels=len(labels))


def finetune(exp: FinetuneExperiment, init_from: str, workdir: str) -> dict[str, Any]:
  """Trains the task head (and backbone) in `workdir` through the pretraining loop, or
  resumes it; writes and returns the held-out measures."""
  from lmjax import train as train_lib
  run = build_run(exp, init_from, workdir)
  metrics = train_lib.run_training(run)
  result = {**metrics, "steps": exp.train.steps, "init": exp.train.init, "init_from": init_from,
            "task": exp.task.kind, "labels": run.meta["labels"]}
  if jax.process_index() == 0:
    paths.write_atomic(paths.join(paths.dirname(run.ckpt.directory), "results.json"),
                       json.dumps(result, indent=2))
  return result
