"""A sweep fixed up front: every combination of a grid, and/or seeded random draws.

Each trial is named by its index and the values it varies (`003_learning_rate=0.002`) and
trains in DIR/<name>/, so an unfinished trial resumes like any run.
"""

from __future__ import annotations

import dataclasses
import itertools
import re
from typing import Any, Mapping, Sequence

import numpy as np

from lmjax.errors import UserError
from lmjax.sweep.space import Distribution, check_distribution


@dataclasses.dataclass(frozen=True)
class Trial:
  name: str
  overrides: dict[str, Any]  # dotted config key -> value


@dataclasses.dataclass(frozen=True)
class Sweep:
  grid: Mapping[str, Sequence[Any]] = dataclasses.field(default_factory=dict)  # all combinations
  random: Mapping[str, Distribution] = dataclasses.field(default_factory=dict)
  num_samples: int = 1  # random draws per grid point (when `random` is set)
  seed: int = 0  # random search is reproducible
  fixed: Mapping[str, Any] = dataclasses.field(default_factory=dict)  # applied to every trial

  def check(self) -> None:
    """One line for the first thing wrong with the sweep itself."""
    for key, values in self.grid.items():
      if isinstance(values, (str, bytes)) or not len(values):
        raise UserError(f"{key}: a grid axis needs a non-empty list of values")
    for key, dist in self.random.items():
      check_distribution(key, dist)
    if self.num_samples < 1:
      raise UserError(f"num_samples must be >= 1, got {self.num_samples}")

  def trials(self) -> list[Trial]:
    rng = np.random.default_rng(self.seed)
    keys = list(self.grid)
    out = []
    for point in itertools.product(*(self.grid[k] for k in keys)):
      for _ in range(self.num_samples if self.random else 1):
        sampled = {k: dist.sample(rng) for k, dist in self.random.items()}
        varied = {**dict(zip(keys, point)), **sampled}
        out.append(Trial(_trial_name(len(out), varied), {**self.fixed, **varied}))
    return out


def _format(value: Any) -> str:
  return f"{value:.3g}" if isinstance(value, float) else str(value)


def _trial_name(index: int, varied: Mapping[str, Any]) -> str:
  parts = [f"{k.split('.')[-1]}={_format(v)}" for k, v in varied.items()]
  return re.sub(r"[^A-Za-z0-9_.=+-]", "_", "_".join([f"{index:03d}", *parts]))[:120]
