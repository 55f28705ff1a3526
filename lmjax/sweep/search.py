"""An adaptive search on Optuna: its space, sampler, pruner and trial count.

A sweep file's `get_sweep()` may return a `Search` instead of a `Sweep`: a space of config
overrides, a sampler that learns from finished trials (TPE, GP, random, grid), a pruner
that stops trials whose held-out metric falls behind (median, ASHA, none) and a trial
count. The study, its workers and its trials are `lmjax.sweep.study`, `.worker` and
`.trials`.

Seeding: every trial draws with a seed of its own, derived from the search's `seed` and
the trial's number in the study (`trial_seed`). Trial numbers are unique in a study, so
workers, array tasks, machines and reruns never share a random stream, and trial n draws
the same random start-up point whoever asks for it. The grid sampler is the exception: all
workers keep the search's seed, which orders the grid, and its points are queued in the
study once, so each goes to exactly one worker.
"""

from __future__ import annotations

import dataclasses
import itertools
from typing import Any, Mapping, Sequence

import numpy as np

from lmjax.errors import UserError
from lmjax.sweep.space import Choice, Distribution, IntUniform, LogUniform, check_distribution

SAMPLERS = ("tpe", "gp", "random", "grid")
PRUNERS = ("median", "asha", "none")


@dataclasses.dataclass(frozen=True)
class Search:
  """An Optuna search over dotted config keys (`optimizer.learning_rate`)."""
  space: Mapping[str, Distribution]
  num_trials: int = 16  # complete + pruned trials the study ends with
  sampler: str = "tpe"
  pruner: str = "asha"
  metric: str = "loss"  # an eval metric of the objective, reported at every evaluation
  direction: str = "minimize"
  seed: int = 0  # with each trial's number, seeds its draws (see above)
  fixed: Mapping[str, Any] = dataclasses.field(default_factory=dict)  # every trial
  enqueue: Sequence[Mapping[str, Any]] = ()  # points tried first (known good settings)
  sampler_options: Mapping[str, Any] = dataclasses.field(default_factory=dict)
  pruner_options: Mapping[str, Any] = dataclasses.field(default_factory=dict)

  def check(self) -> None:
    """One line for the first thing wrong with the search itself."""
    if self.sampler not in SAMPLERS:
      raise UserError(f"unknown sampler {self.sampler!r}; use one of {', '.join(SAMPLERS)}")
    if self.pruner not in PRUNERS:
      raise UserError(f"unknown pruner {self.pruner!r}; use one of {', '.join(PRUNERS)}")
    if self.direction not in ("minimize", "maximize"):
      raise UserError(f"direction must be 'minimize' or 'maximize', not {self.direction!r}")
    if self.num_trials < 1:
      raise UserError(f"num_trials must be >= 1, got {self.num_trials}")
    if not isinstance(self.seed, int) or self.seed < 0:
      raise UserError(f"seed must be an integer >= 0, got {self.seed!r}")
    if not self.space:
      raise UserError("the search space is empty")
    for key, dist in self.space.items():
      check_distribution(key, dist, grid=self.sampler == "grid")
    if self.sampler == "grid" and self.num_trials > len(grid_points(self)):
      raise UserError(f"num_trials={self.num_trials} is more than the grid's points")
    for what, make in (("sampler_options", lambda: base_sampler(self, self.seed)),
                       ("pruner_options", lambda: make_pruner(self.pruner, self.pruner_options))):
      try:  # a misspelt option is Optuna's TypeError deep in the study's creation
        make()
      except (TypeError, ValueError) as e:
        raise UserError(f"{what}: {e}") from None

  def check_keys(self, config: Any) -> None:
    """Every searched or fixed key must be a field of the experiment config."""
    for key in [*self.space, *self.fixed]:
      node = config
      for part in key.split("."):
        if not hasattr(node, "keys") or part not in node.keys():
          raise UserError(f"search parameter {key!r} is not a config field (no {part!r})")
        node = node[part]


def trial_seed(seed: int, number: int) -> int:
  """The seed trial `number` draws with: independent streams for every (seed, number)."""
  return int(np.random.SeedSequence([seed, number]).generate_state(1)[0])


def grid_points(search: Search) -> list[dict[str, Any]]:
  """The grid sampler's points in the order the search's seed gives them (a seeded shuffle,
  as Optuna's GridSampler does): with fewer trials than points, a seeded subset."""
  keys = list(search.space)
  values = [search.space[k].values for k in keys]
  points = [dict(zip(keys, p)) for p in itertools.product(*values)]
  order = np.random.default_rng(search.seed).permutation(len(points))
  return [points[i] for i in order]


def base_sampler(search: Search, seed: int) -> Any:
  """Optuna's sampler for the search, drawing with `seed`."""
  import optuna
  opts = dict(search.sampler_options)
  if search.sampler == "tpe":
    return optuna.samplers.TPESampler(seed=seed, **opts)
  if search.sampler == "gp":
    return optuna.samplers.GPSampler(seed=seed, **opts)
  if search.sampler == "random":
    return optuna.samplers.RandomSampler(seed=seed, **opts)  # none: a typo is an error
  grid = {k: list(d.values) for k, d in search.space.items()}
  return optuna.samplers.GridSampler(grid, seed=seed, **opts)


def make_sampler(search: Search) -> Any:
  """The study's sampler: one that reseeds itself for every trial (`trial_seed`); the grid
  sampler keeps the search's seed in every worker (its points are queued, not drawn)."""
  if search.sampler == "grid":
    return base_sampler(search, search.seed)
  from lmjax.sweep.seeding import TrialSeededSampler
  return TrialSeededSampler(lambda seed: base_sampler(search, seed), search.seed, trial_seed)


def make_pruner(name: str, options: Mapping[str, Any]) -> Any:
  import optuna
  if name == "median":
    return optuna.pruners.MedianPruner(**options)
  if name == "asha":  # asynchronous successive halving
    return optuna.pruners.SuccessiveHalvingPruner(**options)
  return optuna.pruners.NopPruner()


def suggest(trial: Any, space: Mapping[str, Distribution]) -> dict[str, Any]:
  """The trial's value of every key of `space` (drawn, or fixed for a queued trial)."""
  out = {}
  for key, dist in space.items():
    if isinstance(dist, Choice):
      out[key] = trial.suggest_categorical(key, list(dist.values))
    elif isinstance(dist, IntUniform):
      out[key] = trial.suggest_int(key, dist.low, dist.high, step=dist.step, log=dist.log)
    else:
      out[key] = trial.suggest_float(key, dist.low, dist.high, log=isinstance(dist, LogUniform))
  return out

