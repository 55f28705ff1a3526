"""Adaptive hyperparameter search on Optuna, with the study kept in a database.

A sweep file's `get_sweep()` may return a `Search` instead of a grid `Sweep`: a space
of config overrides, a sampler that learns from finished trials (TPE, GP, random,
grid), a pruner that stops trials whose held-out metric falls behind (median,
ASHA, none) and a trial count. Every trial is an ordinary `launch.train` run in
DIR/trial_NNNN/; the training loop reports each evaluation to its trial
(`TrialReporter`) and a pruned trial stops after writing its checkpoint.

The study lives in a database (an SQLite file in the sweep directory unless
`--storage` names PostgreSQL, MySQL or a journal file), so any number of workers on
any machines share one search and a killed sweep carries on. A worker marks its
running trial with a heartbeat; a trial whose heartbeat is older than the grace
period (its worker died) is failed and queued again with the same parameters and
directory, so it resumes from its checkpoint, and only complete and pruned trials
count towards the total.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import random
import threading
import time
from typing import Any, Callable, Iterator, Mapping, Sequence

from lmjax import paths
from lmjax.errors import UserError
from lmjax.sweep import Choice, LogUniform, Uniform

SAMPLERS = ("tpe", "gp", "random", "grid")
PRUNERS = ("median", "asha", "none")
HEARTBEAT = "lmjax_heartbeat"  # trial system attribute: the worker's last sign of life
DIR_ATTR = "lmjax_dir"  # trial user attribute: its run directory (kept by retries)
PRUNED_FILE = "pruned.json"  # written by the trial's training run when it is pruned


@dataclasses.dataclass(frozen=True)
class IntUniform:
  low: int
  high: int
  log: bool = False
  step: int = 1  # values low, low + step, ..., high: a coarse lattice pins its ends exactly


Distribution = LogUniform | Uniform | IntUniform | Choice


@dataclasses.dataclass(frozen=True)
class Search:
  """An Optuna search over dotted config keys (`optimizer.learning_rate`)."""
  space: Mapping[str, Distribution]
  num_trials: int = 16  # complete + pruned trials the study ends with
  sampler: str = "tpe"
  pruner: str = "asha"
  metric: str = "loss"  # an eval metric of the objective, reported at every evaluation
  direction: str = "minimize"
  seed: int = 0
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
    if not self.space:
      raise UserError("the search space is empty")
    for key, dist in self.space.items():
      _check_distribution(key, dist, self.sampler)
    if self.sampler == "grid" and self.num_trials > math.prod(
        len(d.values) for d in self.space.values()):
      raise UserError(f"num_trials={self.num_trials} is more than the grid's points")
    for what, make in (("sampler_options", _sampler), ("pruner_options", _pruner)):
      try:  # a misspelt option is Optuna's TypeError deep in the study's creation
        make(self)
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


def _check_distribution(key: str, dist: Any, sampler: str) -> None:
  if isinstance(dist, Choice):
    if not dist.values:
      raise UserError(f"{key}: Choice has no values")
    return
  if sampler == "grid":
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


# ------------------------------------------------------------------------------- the study

def default_storage(workdir: str) -> str:
  return f"sqlite:///{paths.join(workdir, 'study.db')}"


def make_storage(url: str) -> Any:
  """An Optuna storage for `url`: sqlite:///, postgresql://, mysql:// or journal:///PATH."""
  import optuna
  import sqlalchemy.exc
  for attempt in range(5):
    try:
      if url.startswith("journal://"):
        from optuna.storages.journal import JournalFileBackend
        return optuna.storages.JournalStorage(JournalFileBackend(url[len("journal://"):]))
      engine = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else {}
      return optuna.storages.RDBStorage(url, engine_kwargs=engine)
    except (sqlalchemy.exc.IntegrityError, sqlalchemy.exc.ProgrammingError):
      # Workers starting together on a new database race to create its tables; the
      # losers find them made when they try again.
      if attempt == 4:
        raise
      time.sleep(0.5 + random.random())
    except Exception as e:  # noqa: BLE001  (sqlalchemy's many errors: one line)
      message = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
      raise UserError(f"cannot open the study storage {url}: {message[:300]}") from None


def _sampler(search: Search) -> Any:
  import optuna
  opts = dict(search.sampler_options)
  if search.sampler == "tpe":
    return optuna.samplers.TPESampler(seed=search.seed, **opts)
  if search.sampler == "gp":
    return optuna.samplers.GPSampler(seed=search.seed, **opts)
  if search.sampler == "random":
    return optuna.samplers.RandomSampler(seed=search.seed, **opts)  # none: a typo is an error
  grid = {k: list(d.values) for k, d in search.space.items()}
  return optuna.samplers.GridSampler(grid, seed=search.seed, **opts)


def _pruner(search: Search) -> Any:
  import optuna
  opts = dict(search.pruner_options)
  if search.pruner == "median":
    return optuna.pruners.MedianPruner(**opts)
  if search.pruner == "asha":  # asynchronous successive halving
    return optuna.pruners.SuccessiveHalvingPruner(**opts)
  return optuna.pruners.NopPruner()


def open_study(search: Search, storage: Any, name: str) -> Any:
  """Creates the study, or joins it; the enqueued points go in once, by its creator."""
  import optuna
  study = optuna.create_study(storage=storage, study_name=name, sampler=_sampler(search),
                              pruner=_pruner(search), direction=search.direction,
                              load_if_exists=True)
  if search.enqueue and not study.user_attrs.get("lmjax_enqueued"):
    study.set_user_attr("lmjax_enqueued", True)
    for point in search.enqueue:
      study.enqueue_trial(dict(point))
  return study


def suggest(trial: Any, space: Mapping[str, Distribution]) -> dict[str, Any]:
  out = {}
  for key, dist in space.items():
    if isinstance(dist, Choice):
      out[key] = trial.suggest_categorical(key, list(dist.values))
    elif isinstance(dist, IntUniform):
      out[key] = trial.suggest_int(key, dist.low, dist.high, step=dist.step, log=dist.log)
    else:
      out[key] = trial.suggest_float(key, dist.low, dist.high, log=isinstance(dist, LogUniform))
  return out


def _states(*names: str) -> tuple:
  from optuna.trial import TrialState
  return tuple(getattr(TrialState, n) for n in names)


def recover_stale(study: Any, grace_s: float) -> list[int]:
  """Fails running trials whose worker stopped beating and queues each again (same
  parameters, same directory: it resumes from its checkpoint). Returns their numbers."""
  from optuna.exceptions import UpdateFinishedTrialError
  from optuna.trial import TrialState
  now, recovered = time.time(), []
  for t in study.get_trials(deepcopy=False, states=_states("RUNNING")):
    beat = t.system_attrs.get(HEARTBEAT, t.datetime_start.timestamp())
    if now - beat <= grace_s:
      continue
    try:  # two workers may find it at once: the database lets one of them finish it
      study._storage.set_trial_state_values(t._trial_id, TrialState.FAIL)
    except UpdateFinishedTrialError:
      continue
    study.enqueue_trial(dict(t.params), user_attrs={
        DIR_ATTR: t.user_attrs.get(DIR_ATTR, trial_dir_name(t.number)),
        "lmjax_retry_of": t.number})
    recovered.append(t.number)
  return recovered


def trial_dir_name(number: int) -> str:
  return f"trial_{number:04d}"


def counts(study: Any) -> dict[str, int]:
  out: dict[str, int] = {}
  for t in study.get_trials(deepcopy=False):
    out[t.state.name.lower()] = out.get(t.state.name.lower(), 0) + 1
  return out


@contextlib.contextmanager
def heartbeat(study: Any, trial_id: int, every_s: float) -> Iterator[None]:
  """Records the trial's heartbeat every `every_s` seconds while the block runs."""
  stop = threading.Event()

  def beat():
    while True:
      try:
        study._storage.set_trial_system_attr(trial_id, HEARTBEAT, time.time())
      except Exception:  # noqa: BLE001  (a database hiccup: the next beat retries)
        pass
      if stop.wait(every_s):
        return
  thread = threading.Thread(target=beat, name="lmjax-heartbeat", daemon=True)
  thread.start()
  try:
    yield
  finally:
    stop.set()
    thread.join(30)


# ------------------------------------------------------------------------------ the worker

def final_metric(trial_dir: str, metric: str) -> float:
  """The metric at a trial's last evaluation (metrics.jsonl)."""
  path = paths.join(trial_dir, "metrics.jsonl")
  text = paths.read_bytes(path).decode() if paths.exists(path) else ""
  values = [r[metric] for r in map(json.loads, filter(str.strip, text.splitlines()))
            if r.get("split") == "eval" and metric in r]
  return values[-1] if values else math.nan


def run_worker(search: Search, storage_url: str, study_name: str, workdir: str,
               run_trial: Callable[[dict[str, Any], str, dict[str, Any]], int],
               heartbeat_s: float = 10.0, grace_s: float = 60.0, max_failures: int = 3
               ) -> list[str]:
  """Draws trials until the study holds `num_trials` complete or pruned ones.
  `run_trial(overrides, directory name, link)` trains one (returns its exit status;
  `link` is what launch.train's --optuna_trial takes). Returns the failed trials."""
  from optuna.trial import TrialState
  study = open_study(search, make_storage(storage_url), study_name)
  failed: list[str] = []
  while len(failed) < max_failures:
    recover_stale(study, grace_s)
    c = counts(study)
    done = c.get("complete", 0) + c.get("pruned", 0)
    if done >= search.num_trials or (
        done + c.get("running", 0) >= search.num_trials and not c.get("waiting", 0)):
      break
    trial = study.ask()
    overrides = {**search.fixed, **suggest(trial, search.space)}
    name = trial.user_attrs.get(DIR_ATTR) or trial_dir_name(trial.number)
    trial.set_user_attr(DIR_ATTR, name)
    _inherit(study, trial)
    if paths.exists(paths.join(workdir, name, PRUNED_FILE)):  # pruned before its worker died
      study.tell(trial, state=TrialState.PRUNED)
      continue
    link = {"storage": storage_url, "study": study_name, "trial_id": trial._trial_id,
            "metric": search.metric, "pruner": search.pruner,
            "pruner_options": dict(search.pruner_options)}
    with heartbeat(study, trial._trial_id, heartbeat_s):
      code = run_trial(overrides, name, link)
    if code != 0:
      study.tell(trial, state=TrialState.FAIL)
      failed.append(name)
    elif paths.exists(paths.join(workdir, name, PRUNED_FILE)):
      study.tell(trial, state=TrialState.PRUNED)
    else:
      study.tell(trial, final_metric(paths.join(workdir, name), search.metric))
  return failed


def _inherit(study: Any, trial: Any) -> None:
  """A retried trial carries on the intermediate values its first attempt reported."""
  first = trial.user_attrs.get("lmjax_retry_of")
  if first is None:
    return
  for t in study.get_trials(deepcopy=False):
    if t.number == first:
      for step, value in t.intermediate_values.items():
        study._storage.set_trial_intermediate_value(trial._trial_id, step, value)


class TrialReporter:
  """launch.train's side of a trial: reports every evaluation's metric and says when the
  pruner stops the run (then writes pruned.json in its directory)."""

  def __init__(self, link: Mapping[str, Any], workdir: str):
    import optuna
    search = Search(space={}, pruner=link["pruner"], pruner_options=link["pruner_options"])
    study = optuna.load_study(study_name=link["study"], storage=make_storage(link["storage"]),
                              pruner=_pruner(search))
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


# ----------------------------------------------------------------------------- summaries

def summarize_study(study: Any, workdir: str) -> list[dict[str, Any]]:
  """summary.csv/.md and loss_curves.png (one row per trial directory, in its latest
  attempt's state), then optimization_history.png and param_importances.png."""
  from lmjax.sweep import Trial, summarize
  latest: dict[str, Any] = {}
  for t in study.get_trials(deepcopy=False):  # by number: a retry replaces its first attempt
    if t.user_attrs.get(DIR_ATTR):
      latest[t.user_attrs[DIR_ATTR]] = t
  rows = summarize(workdir, [Trial(name, dict(t.params)) for name, t in latest.items()],
                   {name: t.state.name.lower() for name, t in latest.items()})
  plot_study(study, workdir)
  return rows


def plot_study(study: Any, workdir: str) -> list[str]:
  """Optuna's optimisation history and parameter importances as PNGs; returns the files
  written (importances need two complete trials)."""
  import io
  import warnings

  import matplotlib
  matplotlib.use("Agg")  # files only, no display
  import matplotlib.pyplot as plt
  from optuna.visualization import matplotlib as vis
  complete = len(study.get_trials(deepcopy=False, states=_states("COMPLETE")))
  plots = [("optimization_history.png", vis.plot_optimization_history, 1),
           ("param_importances.png", vis.plot_param_importances, 2)]
  written = []
  for name, plot, needed in plots:
    if complete < needed:
      continue
    with warnings.catch_warnings():
      warnings.simplefilter("ignore")  # optuna's ExperimentalWarning for the matplotlib backend
      ax = plot(study)
    fig = ax.figure
    fig.set_size_inches(8, 5)
    fig.tight_layout()
    image = io.BytesIO()
    fig.savefig(image, format="png", dpi=100)
    plt.close(fig)
    paths.write_atomic(paths.join(workdir, name), image.getvalue())
    written.append(name)
  return written
