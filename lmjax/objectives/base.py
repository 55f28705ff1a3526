"""The interface an objective implements, and the registry that names objectives.

The training loop (`lmjax.train`) knows no objective by name. It asks the run's
`Objective` for five things: its batches (`datasets`), its model with the head it
needs (`build_model`), the model inputs, targets and weights of a batch (`prepare`,
traced), the summed loss terms (`loss_sums`, traced; the form gradient accumulation
and `summarize` use) and its held-out measures (`eval_sums`, `eval_metrics`).
Sharding, accumulation, non-finite skips, checkpoints and exact resume stay the
loop's, so every objective has them.

An objective is a subclass registered under a name, which `objective.kind` selects:

    @register("clm_aux")
    class CLMWithAux(CLM):
      config_class = AuxConfig  # its own options, a subclass of ObjectiveConfig
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

from lmjax.errors import UserError, check_ranges

Array = jax.Array
Batch = dict[str, Array]

_REGISTRY: dict[str, type["Objective"]] = {}
_BUILT_IN: set[str] = set()  # lmjax's own names: research code cannot replace them


@dataclasses.dataclass(frozen=True)
class ObjectiveConfig:
  # A registered objective: clm | mlm (pretraining) | classification | regression | qa
  # (fine-tuning, set by launch.finetune from the task) | one an experiment file registers.
  kind: str = "clm"
  mask_rate: float = 0.15  # MLM: share of ordinary tokens selected as targets (exact per row)
  mask_token_prob: float = 0.8  # of the selected: replaced by [MASK]
  random_token_prob: float = 0.1  # of the selected: replaced by a random token; rest kept
  z_loss: float = 0.0  # weight of log(Z)^2, keeps logits from drifting
  label_smoothing: float = 0.0
  # Vocabulary head + loss fused over chunks of positions, never building the (B, T, V)
  # logits (`fused_cross_entropy_sums`): auto (on CPU, where it is faster) | on | off.
  fused_head: str = "auto"

  def __post_init__(self):
    if self.kind not in _REGISTRY:
      raise ValueError(f"objective.kind must be one of {', '.join(registered())}, got "
                       f"{self.kind!r} (an objective of your own: register it, see "
                       "experiments/custom_objective.py)")
    check_ranges("objective", self, non_negative=("z_loss", "mask_token_prob", "random_token_prob"),
                 fractions=("label_smoothing",))
    if self.fused_head not in ("auto", "on", "off"):
      raise ValueError(f"objective.fused_head must be auto, on or off, got {self.fused_head!r}")
    if not 0 < self.mask_rate < 1 or self.mask_token_prob + self.random_token_prob > 1:
      raise ValueError("objective: need 0 < mask_rate < 1 and mask_token_prob + "
                       "random_token_prob <= 1")

  def use_fused_head(self) -> bool:
    """Whether the train and eval steps fuse the vocabulary head into the loss. `auto`: on
    CPU, where XLA's (N, V) logits matmuls and their transposes cost a third of a small
    model's step; on TPU and GPU, fused matmuls of the full logits are the faster path."""
    if self.fused_head == "auto":
      return jax.default_backend() == "cpu"
    return self.fused_head == "on"

  def predictions(self, seq_len: int) -> int:
    """Positions per row the vocabulary head runs on (for FLOP counts)."""
    return _REGISTRY[self.kind].head_positions(self, seq_len)


class Dataset(Protocol):
  """Batches as pure functions of (seed, step): what the loop reads (`PackedDataset`,
  `TaskDataset`)."""

  def batch(self, step: int, global_batch: int, process_index: int = 0,
            process_count: int = 1) -> dict[str, np.ndarray]: ...

  def eval_batch(self, index: int, global_batch: int, process_index: int = 0,
                 process_count: int = 1) -> dict[str, np.ndarray]: ...

  def num_eval_batches(self, global_batch: int) -> int: ...


class Objective:
  """What the training loop optimises. Defaults suit a language model; subclasses
  override what differs, `register` names them.

  Built once per run with its config, the tokenizer's special ids, the model's
  vocabulary size and, for a fine-tuning objective, the `task` section of
  `launch.finetune` (its files, labels, lengths).
  """

  kind: ClassVar[str] = ""  # the registered name (set by `register`)
  config_class: ClassVar[type] = ObjectiveConfig  # its typed options
  needs_task: ClassVar[bool] = False  # fine-tuning only: data from `task`, not `data`
  options_section: ClassVar[str] = ""  # launch.finetune: the config section of its options

  def __init__(self, cfg: ObjectiveConfig, special: Any, vocab_size: int, task: Any = None):
    self.cfg, self.special, self.vocab_size, self.task = cfg, special, vocab_size, task

  # -- data and model (host, once per run)

  def datasets(self, data: Any, tokenizer: Any, model: Any, seed: int
               ) -> tuple[Dataset, Dataset]:
    """(train, eval) batches: `data` is the run's DataConfig, `model` its TransformerConfig."""
    raise NotImplementedError(f"objective {self.kind!r} builds no datasets")

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

  def summarize(self, sums: dict[str, Array]) -> dict[str, Array]:
    """Metrics of summed terms (train lines and evaluation alike)."""
    from lmjax.objectives.losses import summarize
    return summarize(sums)

  # -- held-out measures (host)

  def eval_metrics(self, sums: dict[str, float], examples: dict[str, np.ndarray]
                   ) -> dict[str, float]:
    """The held-out measures from the eval set's summed terms and gathered examples."""
    return {k: float(v) for k, v in self.summarize(sums).items()}

  @classmethod
  def head_positions(cls, cfg: ObjectiveConfig, seq_len: int) -> int:
    """Positions per row the vocabulary head runs on (FLOP counts and MFU)."""
    return seq_len


def register(name: str) -> Callable[[type[Objective]], type[Objective]]:
  """Class decorator: makes an `Objective` subclass `objective.kind=name`."""
  def add(cls: type[Objective]) -> type[Objective]:
    if not (isinstance(cls, type) and issubclass(cls, Objective)):
      raise TypeError(f"register({name!r}) takes an Objective subclass, got {cls!r}")
    if not issubclass(cls.config_class, ObjectiveConfig):
      raise TypeError(f"{cls.__name__}.config_class must subclass ObjectiveConfig")
    if name in _BUILT_IN and _REGISTRY[name] is not cls:
      raise ValueError(f"objective {name!r} is lmjax's own; register yours under another name")
    cls.kind = name
    _REGISTRY[name] = cls
    if cls.__module__.startswith("lmjax."):
      _BUILT_IN.add(name)
    return cls
  return add


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
