"""The `optimizer` section, the registry of optimizers, and what every optimizer shares.

An optimizer is a subclass of `Optimizer` registered under a name, which
`optimizer.kind` selects; its `transform(schedule)` is the optax update without
clipping (the registry adds global-norm clipping before it and µP's per-layer
rates after it, the same for every optimizer). Research code registers its own in
the experiment file that uses it (`experiments/custom_optimizer.py`), with options
in a subclass of `OptimizerConfig`:

    @optim.register("signum")
    class Signum(optim.Optimizer):
      config_class = SignumConfig
      def transform(self, schedule): ...
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, ClassVar, Mapping

import jax
import optax

from lmjax.errors import UserError, check_ranges

_REGISTRY: dict[str, type["Optimizer"]] = {}
_BUILT_IN: set[str] = set()  # lmjax's own names: research code cannot replace them
SCHEDULES = ("cosine", "linear", "constant", "wsd")
DECAY_SHAPES = ("linear", "cosine", "1-sqrt")


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
  learning_rate: float = 3e-4  # peak, reached at the end of warmup
  warmup_steps: int = 100
  schedule: str = "cosine"  # after warmup: cosine | linear | constant | wsd (warmup-stable-decay)
  end_lr_ratio: float = 0.1  # final learning rate as a fraction of the peak
  b1: float = 0.9  # adamw, lion; schedule_free_adamw: the interpolation between x and z
  b2: float = 0.95  # adamw, lion (Lion's paper: 0.99), schedule_free_adamw
  eps: float = 1e-8
  weight_decay: float = 0.1  # decoupled (x learning rate); kernels and embeddings only
  clip_grad_norm: float = 1.0  # global-norm clipping; 0 disables
  # (fields above keep lmjax 0.1's order: positional construction still works)
  # adamw | muon | adafactor | lion | schedule_free_adamw, or one an experiment file registers
  kind: str = "adamw"
  # wsd: the decay phase. Its start is `decay_start` if set, else train.steps - decay_steps if
  # set, else train.steps x (1 - decay_fraction); it ends at train.steps.
  decay_steps: int = 0
  decay_fraction: float = 0.2
  decay_start: int = 0  # a cooldown branched at step K of a stable run: decay_start=K
  decay_shape: str = "linear"  # wsd: linear | cosine | 1-sqrt
  # muon (2-D hidden matrices; embeddings, norms, biases and the head take AdamW):
  muon_momentum: float = 0.95
  muon_nesterov: bool = True
  muon_ns_steps: int = 5  # Newton-Schulz iterations
  # Muon's update x rms_scale x sqrt(max(fan_in, fan_out)): an RMS like AdamW's, so one
  # learning rate and weight decay serve both halves (Liu et al. 2025); 0: Jordan's
  # sqrt(max(1, fan_out / fan_in)) scaling, which wants its own (larger) learning rate.
  muon_rms_scale: float = 0.2
  # adafactor (factored second moments; no first moment):
  adafactor_decay_rate: float = 0.8  # second moments decay as 1 - step^-decay_rate
  adafactor_min_dim: int = 128  # factor a matrix only if its two largest dims reach this
  adafactor_parameter_scale: bool = True  # steps relative to each parameter block's RMS

  def __post_init__(self):
    if self.kind not in _REGISTRY:
      raise ValueError(f"optimizer.kind must be one of {', '.join(registered())}, got "
                       f"{self.kind!r} (an optimizer of your own: register it, see "
                       "experiments/custom_optimizer.py)")
    if self.schedule not in SCHEDULES:
      raise ValueError(f"optimizer.schedule must be cosine, linear, constant or wsd, got "
                       f"{self.schedule!r}")
    if self.decay_shape not in DECAY_SHAPES:
      raise ValueError(f"optimizer.decay_shape must be one of {', '.join(DECAY_SHAPES)}, got "
                       f"{self.decay_shape!r}")
    if self.decay_steps and self.decay_start:
      raise ValueError("optimizer.decay_steps and optimizer.decay_start both set: give one")
    check_ranges("optimizer", self, positive=("eps", "muon_ns_steps", "adafactor_min_dim"),
                 non_negative=("learning_rate", "warmup_steps", "end_lr_ratio", "weight_decay",
                               "clip_grad_norm", "decay_steps", "decay_start", "muon_rms_scale",
                               "adafactor_decay_rate"),
                 fractions=("b1", "b2", "muon_momentum", "decay_fraction"))


class Optimizer:
  """An update rule: `transform(schedule)` returns its optax transformation.

  Built once per run with its config and the run's total steps. `param_axes()` gives
  the logical axis names of every parameter (a tree like the parameters, each leaf a
  tuple such as ('layers', 'embed', 'mlp')), for optimizers that treat axes
  differently (Muon: which axes form the matrix, which are a stack of layers).
  """

  kind: ClassVar[str] = ""  # the registered name (set by `register`)
  config_class: ClassVar[type] = OptimizerConfig  # its typed options
  # Per-coordinate normalised updates (Adam-like): µP's Adam rule (hidden matrices' rates
  # / width_mult) applies. Others refuse a µP model wider than its base.
  elementwise: ClassVar[bool] = True

  def __init__(self, cfg: OptimizerConfig, total_steps: int,
               param_axes: Callable[[], Any] | None = None):
    self.cfg, self.total_steps, self._param_axes = cfg, total_steps, param_axes

  def param_axes(self) -> Any:
    if self._param_axes is None:
      raise UserError(f"optimizer.kind={self.kind} needs the parameters' logical axis names; "
                      "build it through lmjax.steps.step_fns")
    return self._param_axes()

  def transform(self, schedule: optax.Schedule) -> optax.GradientTransformation:
    """The update (after clipping), learning rate and weight decay included."""
    raise NotImplementedError

  def gradient_point(self, params: Any, state: Any) -> Any:
    """Where the gradient of a step is taken, from the parameters and this optimizer's
    state: the parameters themselves, except for schedule-free methods, whose
    parameters are the averaged point that evaluation and exports use."""
    return params


def register(name: str) -> Callable[[type[Optimizer]], type[Optimizer]]:
  """Class decorator: makes an `Optimizer` subclass `optimizer.kind=name`."""
  def add(cls: type[Optimizer]) -> type[Optimizer]:
    if not (isinstance(cls, type) and issubclass(cls, Optimizer)):
      raise TypeError(f"optim.register({name!r}) takes an Optimizer subclass, got {cls!r}")
    if name in _BUILT_IN and _REGISTRY[name] is not cls:
      raise ValueError(f"optimizer {name!r} is lmjax's own; register yours under another name")
    if not issubclass(cls.config_class, OptimizerConfig):
      raise TypeError(f"{cls.__name__}.config_class must subclass OptimizerConfig")
    cls.kind = name
    _REGISTRY[name] = cls
    if cls.__module__.startswith("lmjax."):
      _BUILT_IN.add(name)
    return cls
  return add


def registered() -> list[str]:
  """The registered names, lmjax's own first."""
  return list(_REGISTRY)


def optimizer_class(kind: str) -> type[Optimizer]:
  if kind not in _REGISTRY:
    raise UserError(f"optimizer.kind must be one of {', '.join(registered())}, got {kind!r} "
                    "(an optimizer of your own: register it, see experiments/custom_optimizer.py)")
  return _REGISTRY[kind]


def optimizer_options(values: Mapping[str, Any]) -> tuple[type, dict[str, Any]]:
  """The config class of `values['kind']` and the options it takes. A key only another
  registered optimizer's options have passes at that default (a research experiment
  whose kind is overridden to adamw keeps its own fields); set otherwise it is an error."""
  cls = optimizer_class(values.get("kind", "adamw")).config_class
  mine = {f.name for f in dataclasses.fields(cls)}
  kept = {}
  for key, value in values.items():
    if key in mine:
      kept[key] = value
      continue
    owners = [c.config_class for c in _REGISTRY.values()
              if key in {f.name for f in dataclasses.fields(c.config_class)}]
    if not owners:  # no optimizer's: the schema's own "unknown config key" line
      kept[key] = value
    elif not any(_default(owner, key) == value for owner in owners):
      raise UserError(f"optimizer.{key} is not an option of optimizer.kind="
                      f"{values.get('kind', 'adamw')} (its options: {', '.join(sorted(mine))})")
  return cls, kept


def _default(cls: type, key: str) -> Any:
  field = next(f for f in dataclasses.fields(cls) if f.name == key)
  return field.default if field.default is not dataclasses.MISSING else field.default_factory()


def leaf_names(path: tuple) -> list[str]:
  """The dict keys of a parameter's path (boxes and other nodes skipped)."""
  return [k.key for k in path if isinstance(k, jax.tree_util.DictKey)]


def decay_mask(params: Any) -> Any:
  """True for matmul kernels and embeddings; norms' scales and all biases are not decayed.

  Decided by parameter name, not rank: scanned stacks give biases a layer axis.
  """
  def is_decayed(path, _):
    names = leaf_names(path)
    return bool(names) and names[-1] in ("kernel", "embedding")
  return jax.tree_util.tree_map_with_path(is_decayed, params)

