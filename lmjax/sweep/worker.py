"""A search's worker: takes trials from the study and trains them, one at a time, until
the study holds `num_trials` complete or pruned ones (only those count, so a retried
trial never counts twice)."""

from __future__ import annotations

from typing import Any, Callable

from absl import logging

from lmjax import paths
from lmjax.sweep import study as study_lib
from lmjax.sweep.report import read_trial_metrics
from lmjax.sweep.search import Search, suggest

# run_trial(overrides, directory name, link) -> exit status; `link` is what launch.train's
# --optuna_trial takes.
RunTrial = Callable[[dict[str, Any], str, dict[str, Any]], int]


def run_worker(search: Search, storage_url: str, study_name: str, workdir: str,
               run_trial: RunTrial, heartbeat_s: float = 10.0, grace_s: float = 60.0,
               max_failures: int = 3) -> list[str]:
  """Trains trials until the study is done; returns the trials that failed here."""
  study = study_lib.open_study(search, study_lib.make_storage(storage_url), study_name)
  failed: list[str] = []
  while len(failed) < max_failures:
    study_lib.recover_stale(study, workdir, grace_s)
    c = study_lib.counts(study)
    done = c.get("complete", 0) + c.get("pruned", 0)
    if done >= search.num_trials or (
        done + c.get("running", 0) >= search.num_trials and not c.get("waiting", 0)):
      break
    # The grid's points are all queued: a grid worker never draws (two could draw alike).
    trial = study_lib.pop_queued(study) if search.sampler == "grid" else study.ask()
    if trial is None:
      break
    overrides = {**search.fixed, **suggest(trial, search.space)}
    name = trial.user_attrs.get(study_lib.DIR_ATTR) or study_lib.trial_dir_name(trial.number)
    trial.set_user_attr(study_lib.DIR_ATTR, name)
    _inherit(study, trial)
    link = {"storage": storage_url, "study": study_name, "trial_id": trial._trial_id,
            "metric": search.metric, "pruner": search.pruner,
            "pruner_options": dict(search.pruner_options)}
    with study_lib.heartbeat(study, trial._trial_id, heartbeat_s):
      pruned_before = paths.exists(paths.join(workdir, name, study_lib.PRUNED_FILE))
      code = 0 if pruned_before else run_trial(overrides, name, link)  # pruned, then killed
      if code != 0:
        failed.append(name)
      _tell(study, trial, code, paths.join(workdir, name), search.metric)
  return failed


def _tell(study: Any, trial: Any, code: int, trial_dir: str, metric: str) -> None:
  """Finishes the trial: failed, pruned (its run wrote pruned.json) or complete with the
  metric at its last evaluation."""
  from optuna.exceptions import UpdateFinishedTrialError
  from optuna.trial import TrialState
  try:
    if code != 0:
      study.tell(trial, state=TrialState.FAIL)
    elif paths.exists(paths.join(trial_dir, study_lib.PRUNED_FILE)):
      study.tell(trial, state=TrialState.PRUNED)
    else:
      study.tell(trial, read_trial_metrics(trial_dir, metric)["final"])
  except UpdateFinishedTrialError:
    # Another worker took it over while this one could not beat (a database outage): its
    # retry resumes the finished run and reports it.
    logging.warning("trial %d was taken over by another worker; its retry reports it",
                    trial.number)


def _inherit(study: Any, trial: Any) -> None:
  """A retried trial carries on the intermediate values its first attempt reported."""
  first = trial.user_attrs.get(study_lib.RETRY_ATTR)
  if first is None:
    return
  for t in study.get_trials(deepcopy=False):
    if t.number == first:
      for step, value in t.intermediate_values.items():
        study._storage.set_trial_intermediate_value(trial._trial_id, step, value)
