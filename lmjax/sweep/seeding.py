"""A sampler that draws every trial with a seed of its own (imports Optuna: load lazily).

Optuna's samplers keep one random stream per instance, so workers built with one seed
draw the same points in the same order, and a rerun draws them again. Optuna's own
parallel loop reseeds each thread from the OS (nothing is reproducible then); here each
trial's stream comes from the study's seed and the trial's number, which the database
hands out once: every worker, machine and rerun draws its own points, and the same trial
number always draws the same random point.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

from optuna.distributions import BaseDistribution
from optuna.samplers import BaseSampler
from optuna.study import Study
from optuna.trial import FrozenTrial, TrialState


class TrialSeededSampler(BaseSampler):
  """Delegates to `make(seed)`, rebuilt before each trial with `derive(seed, number)`."""

  def __init__(self, make: Callable[[int], BaseSampler], seed: int,
               derive: Callable[[int, int], int]):
    self._make, self._seed, self._derive = make, seed, derive
    self._inner = make(seed)

  @property
  def inner(self) -> BaseSampler:
    return self._inner

  def before_trial(self, study: Study, trial: FrozenTrial) -> None:
    # Called first when a trial starts (optuna.Trial's constructor), in the worker that
    # asked for it: the samplers keep nothing between trials that the study does not hold.
    self._inner = self._make(self._derive(self._seed, trial.number))
    self._inner.before_trial(study, trial)

  def infer_relative_search_space(self, study: Study, trial: FrozenTrial
                                  ) -> dict[str, BaseDistribution]:
    return self._inner.infer_relative_search_space(study, trial)

  def sample_relative(self, study: Study, trial: FrozenTrial,
                      search_space: dict[str, BaseDistribution]) -> dict[str, Any]:
    return self._inner.sample_relative(study, trial, search_space)

  def sample_independent(self, study: Study, trial: FrozenTrial, param_name: str,
                         param_distribution: BaseDistribution) -> Any:
    return self._inner.sample_independent(study, trial, param_name, param_distribution)

  def after_trial(self, study: Study, trial: FrozenTrial, state: TrialState,
                  values: Sequence[float] | None) -> None:
    self._inner.after_trial(study, trial, state, values)

  def reseed_rng(self) -> None:
    self._inner.reseed_rng()

