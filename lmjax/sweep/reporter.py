"""launch.train's side of a search trial: each evaluation reported to the study, and the
pruner's verdict (a pruned run writes its checkpoint and pruned.json, then ends)."""

from __future__ import annotations

import json
from typing import Any, Mapping

from lmjax import paths
from lmjax.errors import UserError
from lmjax.sweep.search import make_pruner
from lmjax.sweep.study import PRUNED_FILE, make_storage


class TrialReporter:
  """`reporter(step, eval_metrics) -> stop`: True once the pruner stops the trial.
  `link` is launch.train's --optuna_trial (storage, study, trial id, metric, pruner)."""

  def __init__(self, link: Mapping[str, Any], workdir: str):
    import optuna
    study = optuna.load_study(study_name=link["study"], storage=make_storage(link["storage"]),
                              pruner=make_pruner(link["pruner"], link["pruner_options"]))
    self.trial = optuna.trial.Trial(study, int(link["trial_id"]))
    self.metric, self.workdir = link["metric"], workdir

  def __call__(self, step: int, metrics: Mapping[str, float]) -> bool:
    if self.metric not in metrics:
      raise UserError(f"the search's metric {self.metric!r} is not an eval metric of this "
                      f"objective ({', '.join(sorted(metrics))})")
    self.trial.report(float(metrics[self.metric]), step)
    if not self.trial.should_prune():
      return False
    paths.write_atomic(paths.join(self.workdir, PRUNED_FILE),
                       json.dumps({"step": step, self.metric: metrics[self.metric]}))
    return True
