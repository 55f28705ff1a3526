"""An experiment as typed dataclasses, built from the plain nested dict of a config file.

Launchers call `experiment_from_dict(config.to_dict())`; library code only ever
sees the dataclasses. Unknown sections or keys and wrongly typed values are
`UserError`s that name the key.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any, Mapping

from lmjax.data.pipeline import DataConfig
from lmjax.distributed import RuntimeConfig
from lmjax.errors import UserError, check_ranges
from lmjax.model.config import TransformerConfig
from lmjax.objectives import ObjectiveConfig, objective_class
from lmjax.optim import OptimizerConfig
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
  init_from: str = ""  # a fresh run starts from these weights: an lmjax run or HF directory
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

  def to_dict(self) -> dict[str, Any]:
    """JSON-compatible nested dict (tuples become lists)."""
    return json.loads(json.dumps(dataclasses.asdict(self)))


_CLASSES = {"model": TransformerConfig, "data": DataConfig, "objective": ObjectiveConfig,
            "optimizer": OptimizerConfig, "train": TrainConfig, "mesh": MeshConfig,
            "runtime": RuntimeConfig}
# Fields that may differ between a checkpoint and the run that resumes it.
NON_ARCHITECTURE_FIELDS = ("attention_impl", "dtype", "remat_policy", "dropout_rate")


def _coerce(key: str, value: Any, default: Any) -> Any:
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


def experiment_from_dict(config: Mapping[str, Any]) -> Experiment:
  unknown = sorted(set(config) - set(_CLASSES))
  if unknown:
    raise UserError(f"unknown config section(s) {', '.join(unknown)} "
                    f"(known: {', '.join(_CLASSES)})")
  classes = dict(_CLASSES)  # a registered objective may bring its own options
  classes["objective"] = objective_class(config.get("objective", {}).get("kind", "clm")).config_class
  sections = {name: section_from_dict(name, cls, config.get(name, {}))
              for name, cls in classes.items()}
  sections["mesh"] = dataclasses.replace(sections["mesh"], rules=check_rules(sections["mesh"].rules))
  return Experiment(**sections)


def default_config() -> dict[str, Any]:
  """Every field of every section at its default: the base each experiment file edits,
  so that any field can be overridden from the command line and typos are errors."""
  return {name: dataclasses.asdict(cls()) for name, cls in _CLASSES.items()}


def architecture(model_dict: Mapping[str, Any]) -> dict[str, Any]:
  """The model fields that decide parameter shapes and meaning."""
  return {k: v for k, v in model_dict.items() if k not in NON_ARCHITECTURE_FIELDS}
