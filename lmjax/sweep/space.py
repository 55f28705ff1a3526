"""The distributions a sweep or a search draws config values from.

A `Sweep` draws them with its own seeded generator (`sample`); a `Search` hands them to
Optuna (`lmjax.sweep.search.suggest`), which samples them the same way.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np

from lmjax.errors import UserError


@dataclasses.dataclass(frozen=True)
class LogUniform:
  low: float
  high: float

  def sample(self, rng: np.random.Generator) -> float:
    return float(math.exp(rng.uniform(math.log(self.low), math.log(self.high))))


@dataclasses.dataclass(frozen=True)
class Uniform:
  low: float
  high: float

  def sample(self, rng: np.random.Generator) -> float:
    return float(rng.uniform(self.low, self.high))


@dataclasses.dataclass(frozen=True)
class IntUniform:
  low: int
  high: int
  log: bool = False
  step: int = 1  # values low, low + step, ..., high: a coarse lattice pins its ends exactly

  def sample(self, rng: np.random.Generator) -> int:
    if not self.log:
      return self.low + self.step * int(rng.integers((self.high - self.low) // self.step + 1))
    # As Optuna draws a log int: uniform in log space over [low - 0.5, high + 0.5], rounded.
    value = math.exp(rng.uniform(math.log(self.low - 0.5), math.log(self.high + 0.5)))
    return min(max(int(round(value)), self.low), self.high)


@dataclasses.dataclass(frozen=True)
class Choice:
  values: tuple

  def sample(self, rng: np.random.Generator) -> Any:
    return self.values[int(rng.integers(len(self.values)))]


Distribution = LogUniform | Uniform | IntUniform | Choice


def check_distribution(key: str, dist: Any, grid: bool = False) -> None:
  """One line for the first thing wrong with `dist` (`grid`: only Choice values)."""
  if isinstance(dist, Choice):
    if not dist.values:
      raise UserError(f"{key}: Choice has no values")
    return
  if grid:
    raise UserError(f"{key}: the grid sampler needs Choice values, not {type(dist).__name__}")
  if not isinstance(dist, (LogUniform, Uniform, IntUniform)):
    raise UserError(f"{key}: {dist!r} is not LogUniform, Uniform, IntUniform or Choice")
  if not dist.low < dist.high:
    raise UserError(f"{key}: empty or inverted range [{dist.low}, {dist.high}]")
  if (isinstance(dist, LogUniform) or getattr(dist, "log", False)) and dist.low <= 0:
    raise UserError(f"{key}: a log range needs bounds > 0, got [{dist.low}, {dist.high}]")
  if isinstance(dist, IntUniform) and (dist.step < 1 or (dist.high - dist.low) % dist.step):
    raise UserError(f"{key}: step {dist.step} does not divide the range [{dist.low}, {dist.high}]")
  if isinstance(dist, IntUniform) and dist.step > 1 and dist.log:
    raise UserError(f"{key}: a log range takes no step (Optuna samples it continuously)")
