"""An experiment as typed dataclasses, built from the plain nested dict of a config file.

One schema for every objective: pretraining (clm, mlm), chat (sft, dpo), task heads
(classification, regression, qa) and registered plug-ins. Launchers call
`experiment_from_dict(config.to_dict())`; library code only ever sees the
dataclasses. Unknown sections or keys and wrongly typed values are `UserError`s
that name the key. Configs of lmjax 0.1's separate fine-tuning schema (`task.kind`,
a `dpo` section) are read through `upgrade_legacy`.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any, Mapping

from absl import logging

from lmjax.data.examples import TaskConfig
from lmjax.data.pipeline import DataConfig
from lmjax.distributed import RuntimeConfig
from lmjax.errors import UserError, check_ranges
from lmjax.lora.config import LoraConfig
from lmjax.model.config import TransformerConfig
from lmjax.objectives import ObjectiveConfig, objective_class, registered
from lmjax.optim import OptimizerConfig, optimizer_options
from lmjax.sharding import MeshConfig, check_rules


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  steps: int = 1000  # total optimizer steps; raise it to continue a finished run
  batch_size: int = 32  # global rows per optimizer step
  grad_accum_steps: int = 1  # microbatches per step (batch_size must divide evenly)
  seed: int = 0  # parameters, data order and masking all derive from it
  log_every: int = 10  # steps between console/metrics lines
  eval_every: int = 100  # steps between evaluations (0: only at the end)
  eval_batches: int = 8  # batches per evaluation (0: the whole eval split)
  checkpoint_every: int = 200  # steps between checkpoints; one is always written at the end
  keep_checkpoints: int = 3  # newest checkpoints kept
  async_checkpoints: bool = True  # write checkpoints in the background
  peak_flops_per_device: float = 0.0  # for MFU; 0 guesses from the device kind
  max_consecutive_skips: int = 10  # stop after this many non-finite steps in a row (0: never)
  # A fresh run starts from these weights: an lmjax run or a Hugging Face directory (for a
  # fine-tuning objective it also decides the architecture and the tokenizer).
  init_from: str = ""
  init: str = "pretrained"  # pretrained | random: init_from's architecture, fresh weights
  # RUN:STEP: a new run starts from that run's whole train state at STEP (a cooldown
  # branched from a stable run; lmjax/cooldown.py)
  branch_from: str = ""
  # lm-evaluation-harness tasks scored during training (decoders, one process; `.[eval]`):
  lm_eval_tasks: tuple[str, ...] = ()
  lm_eval_every: int = 0  # steps between harness runs (0: at the end only)
  lm_eval_limit: int = 0  # documents per task (0: all)
  lm_eval_include_path: str = ""  # folder of local task YAML files
  # (first, last) step to trace with jax.profiler into WORKDIR/tensorboard (TensorBoard's
  # profile plugin shows it); () = off
  profile_steps: tuple[int, ...] = ()

  def __post_init__(self):
    check_ranges("train", self, positive=("steps", "batch_size", "grad_accum_steps", "log_every",
                                          "checkpoint_every", "keep_checkpoints"),
                 non_negative=("seed", "eval_every", "eval_batches", "peak_flops_per_device",
                               "max_consecutive_skips", "lm_eval_every", "lm_eval_limit"))
    if self.branch_from and self.init_from:
      raise ValueError("train.branch_from and train.init_from both set: give one")
    if self.init not in ("pretrained", "random"):
      raise ValueError(f"train.init must be 'pretrained' or 'random', got {self.init!r}")
    if self.profile_steps and not (len(self.profile_steps) == 2 and
                                   1 <= self.profile_steps[0] <= self.profile_steps[1]):
      raise ValueError(f"train.profile_steps must be (first, last) with 1 <= first <= last, "
                       f"got {self.profile_steps}")


@dataclasses.dataclass(frozen=True)
class Experiment:
  model: TransformerConfig
  data: DataConfig
  objective: ObjectiveConfig
  optimizer: OptimizerConfig
  train: TrainConfig
  mesh: MeshConfig
  runtime: RuntimeConfig = RuntimeConfig()
  task: TaskConfig = TaskConfig()  # the labelled files of a fine-tuning objective
  lora: LoraConfig = LoraConfig()  # low-rank adapters on a frozen base (docs/post_training.md)

  def to_dict(self) -> dict[str, Any]:
    """JSON-compatible nested dict (tuples become lists)."""
    return json.loads(json.dumps(dataclasses.asdict(self)))


_CLASSES = {"model": TransformerConfig, "data": DataConfig, "objective": ObjectiveConfig,
            "optimizer": OptimizerConfig, "train": TrainConfig, "mesh": MeshConfig,
            "runtime": RuntimeConfig, "task": TaskConfig, "lora": LoraConfig}
# How a model computes, not what it is: these may differ between a checkpoint and the run
# that resumes it, and a fine-tuning run takes them from its experiment, not its source.
COMPUTE_FIELDS = ("attention_impl", "dtype", "remat_policy", "dropout_rate")
NON_ARCHITECTURE_FIELDS = COMPUTE_FIELDS  # the name lmjax 0.1 used


def _coerce(key: str, value: Any, default: Any) -> Any:
  if dataclasses.is_dataclass(default):  # a nested section (model.moe): its own keys, typed
    if isinstance(value, type(default)):
      return value
    if not isinstance(value, Mapping):
      raise UserError(f"config key {key} must be a section of {type(default).__name__} "
                      f"fields, got {value!r}")
    return section_from_dict(key, type(default), value)
  if isinstance(default, bool):
    ok = isinstance(value, bool)
  elif isinstance(default, int):
    ok = isinstance(value, int) and not isinstance(value, bool)
  elif isinstance(default, float):
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    value = float(value) if ok else value
  elif isinstance(default, str):
    ok = isinstance(value, str)
  elif isinstance(default, tuple):
    ok = isinstance(value, (list, tuple))
    value = tuple(tuple(v) if isinstance(v, list) else v for v in value) if ok else value
  else:
    ok = True
  if not ok:
    raise UserError(f"config key {key} must be of type {type(default).__name__}, "
                    f"got {value!r}")
  return value


def section_from_dict(name: str, cls: type, values: Mapping[str, Any]):
  fields = {f.name: f for f in dataclasses.fields(cls)}
  kwargs = {}
  for key, value in values.items():
    if key not in fields:
      raise UserError(f"unknown config key {name}.{key} (known: {', '.join(sorted(fields))})")
    default = fields[key].default
    if default is dataclasses.MISSING:
      default = fields[key].default_factory()  # type: ignore[misc]
    kwargs[key] = _coerce(f"{name}.{key}", value, default)
  try:
    return cls(**kwargs)
  except ValueError as e:
    raise UserError(str(e)) from None


def _objective_options(values: Mapping[str, Any]) -> tuple[type, dict[str, Any]]:
  """The objective's config class and its options. A key another objective owns passes
  at its default (a config whose `kind` was overridden keeps the old kind's defaults);
  set to anything else it is an error naming the options this kind has."""
  cls = objective_class(values.get("kind", "clm")).config_class
  mine = {f.name for f in dataclasses.fields(cls)}
  kept = {}
  for key, value in values.items():
    if key in mine:
      kept[key] = value
    elif not any(getattr(objective_class(kind).config_class(), key, object()) == value
                 for kind in registered() if key in _field_names(kind)):
      raise UserError(f"objective.{key} is not an option of objective.kind="
                      f"{values.get('kind', 'clm')} (its options: {', '.join(sorted(mine))})")
  return cls, kept


def _field_names(kind: str) -> set[str]:
  return {f.name for f in dataclasses.fields(objective_class(kind).config_class)}


def experiment_from_dict(config: Mapping[str, Any]) -> Experiment:
  config = upgrade_legacy(config)
  unknown = sorted(set(config) - set(_CLASSES))
  if unknown:
    raise UserError(f"unknown config section(s) {', '.join(unknown)} "
                    f"(known: {', '.join(_CLASSES)})")
  cls, options = _objective_options(config.get("objective", {}))
  sections = {name: section_from_dict(name, klass, config.get(name, {}))
              for name, klass in _CLASSES.items() if name not in ("objective", "optimizer")}
  sections["objective"] = section_from_dict("objective", cls, options)
  sections["optimizer"] = section_from_dict("optimizer", *optimizer_options(
      config.get("optimizer", {})))  # the options of its kind (a registered optimizer's own)
  sections["mesh"] = dataclasses.replace(sections["mesh"], rules=check_rules(sections["mesh"].rules))
  return Experiment(**sections)


def default_config(objective: str = "clm") -> dict[str, Any]:
  """Every field of every section at its default, the objective section holding the
  options of `objective`: the base each experiment file edits, so that any field can be
  overridden from the command line and typos are errors."""
  out = {name: dataclasses.asdict(cls()) for name, cls in _CLASSES.items()}
  out["objective"] = dataclasses.asdict(objective_class(objective).config_class(kind=objective))
  return out


def architecture(model_dict: Mapping[str, Any]) -> dict[str, Any]:
  """The model fields that decide parameter shapes and meaning (a saved config written
  before a field existed reads as that field's default)."""
  defaults = json.loads(json.dumps(dataclasses.asdict(TransformerConfig())))  # as saved: lists
  full = {**defaults, **model_dict}
  for key, value in defaults.items():  # nested sections (model.moe) are filled field by field
    if isinstance(value, dict) and isinstance(full[key], Mapping):
      full[key] = {**value, **full[key]}
  return {k: v for k, v in full.items() if k not in COMPUTE_FIELDS}


# --------------------------------------------------- lmjax 0.1's fine-tuning schema, read

# Where each `task.X` of lmjax 0.1 lives now, by objective (fields not named stay in task).
_LEGACY_TASK_FIELDS = {
    "seq_len": "data", "dropout_rate": "model",
    "chat_template": "objective", "truncation": "objective", "pack": "objective",
    "doc_stride": "objective", "max_answer_tokens": "objective", "n_best": "objective",
    "null_threshold": "objective"}


def upgrade_legacy(config: Mapping[str, Any]) -> dict[str, Any]:
  """A config of lmjax 0.1's fine-tuning schema (`task.kind`, `task.seq_len`, a `dpo`
  section; what `default_finetune_config()` built) in today's schema; others as given."""
  config = {k: dict(v) if isinstance(v, Mapping) else v for k, v in config.items()}
  task = config.get("task", {})
  if "kind" not in task and "dpo" not in config:
    return config
  kind = task.pop("kind", "classification")  # that schema's default
  logging.warning("this experiment uses lmjax 0.1's fine-tuning schema (task.kind=%s); it "
                  "reads as objective.kind=%s: see docs/post_training.md to update it", kind,
                  kind)
  objective = {"kind": kind, **config.get("objective", {})}
  options = _field_names(kind)
  for key, section in _LEGACY_TASK_FIELDS.items():
    if key in task:
      value = task.pop(key)
      if section != "objective":
        config.setdefault(section, {})[key] = value
      elif key in options:
        objective[key] = value
  dpo = config.pop("dpo", {})
  if kind == "dpo":
    objective.update(dpo)
  config["objective"], config["task"] = objective, task
  return config
