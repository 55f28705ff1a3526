"""The interface an objective implements, and the registry that names objectives.

The training loop (`lmjax.loop`) knows no objective by name. It asks the run's
`Objective` for five things: its batches (`datasets`), its model with the head it
needs (`build_model`), the model inputs, targets and weights of a batch (`prepare`,
traced), the summed loss terms (`loss_sums`, traced; the form gradient accumulation
and `metrics` use) and its held-out measures (`eval_sums`, `eval_metrics`).
Sharding, accumulation, non-finite skips, checkpoints and exact resume stay the
loop's, so every objective has them.

An objective is a subclass registered under a name, which `objective.kind` selects:

    @register("clm_aux")
    class CLMWithAux(CLM):
      config_class = AuxConfig  # its options: a subclass of CLM's (`LMConfig`)
      def loss_sums(self, model, params, batch, rngs): ...

Research code registers its own in the file that uses it (an experiment file is
imported before its config is read: `experiments/custom_objective.py`).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, ClassVar, Protocol

import flax.linen as nn
import jax
import numpy as np

from lmjax.errors import UserError

Array = jax.Array
Batch = dict[str, Array]

_REGISTRY: dict[str, type["Objective"]] = {}
_BUILT_IN: set[str] = set()  # lmjax's own names: research code cannot replace them


@dataclasses.dataclass(frozen=True)
class ObjectiveConfig:
  """The `objective` section: which objective, and (in each objective's subclass of this
  class) its options. lmjax's: clm, mlm (pretraining); sft, dpo (chat); classification,
  regression, qa (task heads); or one an experiment file registers."""

  kind: str = "clm"

  def __post_init__(self):
    if self.kind not in _REGISTRY:
      raise ValueError(f"objective.kind must be one of {', '.join(registered())}, got "
                       f"{self.kind!r} (an objective of your own: register it, see "
                       "experiments/custom_objective.py)")

  def predictions(self, seq_len: int) -> int:
    """Positions per row the vocabulary head runs on (for FLOP counts)."""
    return _REGISTRY[self.kind].head_positions(self, seq_len)


class Dataset(Protocol):
  """Batches as pure functions of (seed, step): what the loop reads (`PackedDataset`,
  `ExampleDataset`)."""

  def batch(self, step: int, global_batch: int, process_index: int = 0,
            process_count: int = 1) -> dict[str, np.ndarray]: ...

  def eval_batch(self, index: int, global_batch: int, process_index: int = 0,
                 process_count: int = 1) -> dict[str, np.ndarray]: ...

  def num_eval_batches(self, global_batch: int) -> int: ...


class Objective:
  """What the training loop optimises. Defaults suit a language model; subclasses
  override what differs, `register` names them.

  Built once per run with its config, the tokenizer's special ids, the model's
  vocabulary size and the experiment's `task` section (the labelled files that the
  fine-tuning objectives read; pretraining objectives ignore it).
  """

  kind: ClassVar[str] = ""  # the registered name (set by `register`)
  config_class: ClassVar[type] = ObjectiveConfig  # its typed options
  # Fine-tuning: starts from `train.init_from` (which decides the architecture and the
  # tokenizer) and reads its examples from the `task` section, not from `data`.
  fine_tunes: ClassVar[bool] = False

  def __init__(self, cfg: ObjectiveConfig, special: Any, vocab_size: int, task: Any = None):
    self.cfg, self.special, self.vocab_size, self.task = cfg, special, vocab_size, task

  # -- data and model (host, once per run)

  def datasets(self, data: Any, tokenizer: Any, model: Any, seed: int
               ) -> tuple[Dataset, Dataset]:
    """(train, eval) batches: `data` is the run's DataConfig, `model` its TransformerConfig."""
    raise NotImplementedError(f"objective {self.kind!r} builds no datasets")

  def batch_spec(self, seq_len: int) -> dict[str, tuple[tuple[int, ...], Any]]:
    """Each batch array's shape per row and dtype, as `datasets` yields them: what
    `lmjax.aot` compiles the step for without reading any data (a test holds the two
    equal for every objective)."""
    rows = {k: ((seq_len,), np.int32) for k in ("tokens", "segment_ids", "positions")}
    return rows

  def build_model(self, model: Any, deterministic: bool) -> nn.Module:
    """The backbone with the head this objective needs."""
    from lmjax.model import build_model
    return build_model(model, deterministic)

  def precompute(self, datasets: tuple, model: nn.Module, params: Any) -> None:
    """A pass of the initial model over the data before training (DPO's reference
    log-probabilities); run at every start, so a resume computes what the start did."""

  def run_files(self) -> dict[str, str]:
    """Files written into the run directory beside its checkpoints (a chat template)."""
    return {}

  def run_outputs(self) -> dict[str, str]:
    """Files written into the run directory after its last evaluation (QA's answers)."""
    return {}

  def label_names(self) -> tuple[str, ...]:
    """The classes a classification head predicts, recorded with the run."""
    return ()

  def is_new_param(self, name: str) -> bool:
    """Whether a parameter may be missing from pretrained weights (a new task head)."""
    return False

  # -- the step (traced inside jit)

  def prepare(self, batch: Batch, rng: Array) -> Batch:
    """Model inputs, targets and weights of a batch; `weights` (any shape) sum to the
    targets the loss is normalised by."""
    return dict(batch)

  def loss_sums(self, model: nn.Module, params: Any, batch: Batch,
                rngs: dict[str, Array]) -> dict[str, Array]:
    """Summed terms of a (micro)batch: `objective` (optimised, divided by the batch's
    total weight), `loss` and `correct` (reported), `weight`; more keys are allowed and
    are summed across microbatches and eval batches alike."""
    raise NotImplementedError

  def eval_sums(self, model: nn.Module, params: Any, batch: Batch) -> dict[str, Array]:
    """One eval batch: scalars are summed over the eval set; arrays with a leading batch
    axis are gathered per example for `eval_metrics`."""
    return self.loss_sums(model, params, batch, {})

  def metrics(self, sums: dict[str, Array]) -> dict[str, Array]:
    """Metrics of summed terms (train lines and evaluation alike)."""
    from lmjax.objectives.losses import token_metrics
    return token_metrics(sums)

  # -- held-out measures (host)

  def eval_metrics(self, sums: dict[str, float], examples: dict[str, np.ndarray]
                   ) -> dict[str, float]:
    """The held-out measures from the eval set's summed terms and gathered examples (and a
    mixture of experts' load per layer and expert, when its router's terms are summed)."""
    from lmjax.model.moe import router_load_metrics
    return {**{k: float(v) for k, v in self.metrics(sums).items()}, **router_load_metrics(sums)}

  @classmethod
  def head_positions(cls, cfg: ObjectiveConfig, seq_len: int) -> int:
    """Positions per row the vocabulary head runs on (FLOP counts and MFU)."""
    return seq_len


def register(name: str) -> Callable[[type[Objective]], type[Objective]]:
  """Class decorator: makes an `Objective` subclass `objective.kind=name`."""
  def add(cls: type[Objective]) -> type[Objective]:
    _check_plugin(name, cls)
    cls.kind = name
    _REGISTRY[name] = cls
    if cls.__module__.startswith("lmjax."):
      _BUILT_IN.add(name)
    return cls
  return add


def _check_plugin(name: str, cls: Any) -> None:
  """Mistakes a plug-in would otherwise pay for at its first step, or never notice."""
  if not (isinstance(cls, type) and issubclass(cls, Objective)):
    raise TypeError(f"register({name!r}) takes an Objective subclass, got {cls!r}")
  if name in _BUILT_IN and _REGISTRY[name] is not cls:
    raise ValueError(f"objective {name!r} is lmjax's own; register yours under another name")
  if "summarize" in vars(cls):  # renamed: an override under the old name is never called
    raise TypeError(f"{cls.__name__}.summarize: the method is now called `metrics`")
  for base in cls.__mro__[1:]:  # the options the inherited code reads must exist
    if getattr(base, "kind", "") in _REGISTRY and not issubclass(cls.config_class, base.config_class):
      raise TypeError(f"{cls.__name__}.config_class must subclass {base.__name__}'s options, "
                      f"{base.config_class.__module__}.{base.config_class.__name__}")
  if not issubclass(cls.config_class, ObjectiveConfig):
    raise TypeError(f"{cls.__name__}.config_class must subclass ObjectiveConfig")


def registered() -> list[str]:
  """The registered names, lmjax's own first (in the order they were registered)."""
  return list(_REGISTRY)


def objective_class(kind: str) -> type[Objective]:
  if kind not in _REGISTRY:
    raise UserError(f"objective.kind must be one of {', '.join(registered())}, got {kind!r} "
                    "(an objective of your own: register it, see experiments/custom_objective.py)")
  return _REGISTRY[kind]


def build(cfg: ObjectiveConfig, special: Any, vocab_size: int, task: Any = None) -> Objective:
  """The objective `cfg.kind` names."""
  return objective_class(cfg.kind)(cfg, special, vocab_size, task)
