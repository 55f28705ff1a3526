"""A search's study in its database: storage, the queue of points, heartbeats and lost trials.

The study lives in a database (an SQLite file in the sweep directory unless `--storage`
names PostgreSQL, MySQL or a journal file), so any number of workers on any machines share
one search and a killed sweep carries on. A worker marks its running trial with a
heartbeat; a trial whose heartbeat is older than the grace period, and whose directory no
live process holds (`lmjax.run_lock`), lost its worker: it is failed and queued again with
the same parameters and directory, so it resumes from its checkpoint.
"""

from __future__ import annotations

import contextlib
import random
import threading
import time
from typing import Any, Iterator

from absl import logging

from lmjax import paths, run_lock
from lmjax.errors import UserError
from lmjax.sweep.search import Search, grid_points, make_pruner, make_sampler

HEARTBEAT = "lmjax_heartbeat"  # trial system attribute: the worker's last sign of life
DIR_ATTR = "lmjax_dir"  # trial user attribute: its run directory (kept by retries)
RETRY_ATTR = "lmjax_retry_of"  # trial user attribute: the number of the attempt it resumes
QUEUED = "lmjax_queue"  # study user attribute: "filling", then "done" (by its creator)
PRUNED_FILE = "pruned.json"  # written by the trial's training run when it is pruned


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
    except (sqlalchemy.exc.IntegrityError, sqlalchemy.exc.ProgrammingError,
            sqlalchemy.exc.OperationalError) as e:
      # Workers starting together on a new database race to create its tables (SQLite:
      # "table ... already exists"); the losers find them made when they try again.
      racing = not isinstance(e, sqlalchemy.exc.OperationalError) or "already exists" in str(e)
      if attempt == 4 or not racing:
        raise UserError(f"cannot open the study storage {url}: {_first_line(e)}") from None
      time.sleep(0.5 + random.random())
    except Exception as e:  # noqa: BLE001  (sqlalchemy's many errors: one line)
      raise UserError(f"cannot open the study storage {url}: {_first_line(e)}") from None


def _first_line(e: BaseException) -> str:
  return (str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__)[:300]


def open_study(search: Search, storage: Any, name: str, wait_s: float = 60.0) -> Any:
  """Creates the study and queues its points (the `enqueue` list, then a grid's points),
  or joins it once its creator has queued them."""
  import optuna
  kwargs = dict(storage=storage, study_name=name, sampler=make_sampler(search),
                pruner=make_pruner(search.pruner, search.pruner_options))
  try:  # the database lets exactly one process create a study
    study = optuna.create_study(direction=search.direction, **kwargs)
  except optuna.exceptions.DuplicatedStudyError:
    study = optuna.load_study(**kwargs)
    deadline = time.monotonic() + wait_s
    while _filling(study) and time.monotonic() < deadline:
      time.sleep(0.5)
    return study
  study.set_user_attr(QUEUED, "filling")
  for point in queued_points(search):
    study.enqueue_trial(point)
  study.set_user_attr(QUEUED, "done")
  return study


def _filling(study: Any) -> bool:
  """Whether the study's creator is still queueing its points (a study an older lmjax
  made has trials and no mark: nothing to wait for)."""
  mark = study.user_attrs.get(QUEUED)
  return mark == "filling" or (mark is None and not study.get_trials(deepcopy=False))


def queued_points(search: Search) -> list[dict[str, Any]]:
  """The points tried first: `enqueue`, then for the grid sampler the grid's points in its
  seeded order, up to `num_trials` in all."""
  points = [dict(p) for p in search.enqueue]
  if search.sampler == "grid":
    points += [p for p in grid_points(search) if p not in points]
    points = points[:max(search.num_trials, len(search.enqueue))]
  return points


def pop_queued(study: Any) -> Any | None:
  """The next queued trial (a grid point, an enqueued point or a retry) marked running,
  or None; never a new draw. The database lets one worker move a trial to running."""
  import optuna
  from optuna.exceptions import UpdateFinishedTrialError
  from optuna.trial import TrialState
  for t in study._storage.get_all_trials(study._study_id, deepcopy=False,
                                         states=(TrialState.WAITING,)):
    try:
      if study._storage.set_trial_state_values(t._trial_id, state=TrialState.RUNNING):
        return optuna.Trial(study, t._trial_id)
    except UpdateFinishedTrialError:
      continue
  return None


def trial_dir_name(number: int) -> str:
  return f"trial_{number:04d}"


def counts(study: Any) -> dict[str, int]:
  out: dict[str, int] = {}
  for t in study.get_trials(deepcopy=False):
    out[t.state.name.lower()] = out.get(t.state.name.lower(), 0) + 1
  return out


def recover_stale(study: Any, workdir: str, grace_s: float) -> list[int]:
  """Fails running trials whose worker stopped beating and whose directory no live
  process holds, and queues each again (same parameters, same directory: it resumes from
  its checkpoint). Returns their numbers."""
  from optuna.exceptions import UpdateFinishedTrialError
  from optuna.trial import TrialState
  now, recovered = time.time(), []
  for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
    beat = t.system_attrs.get(HEARTBEAT, t.datetime_start.timestamp())
    name = t.user_attrs.get(DIR_ATTR, trial_dir_name(t.number))
    if now - beat <= grace_s or run_lock.holder(paths.join(workdir, name), grace_s):
      continue  # a worker that lost the database but still trains keeps its trial
    try:  # two workers may find it at once: the database lets one of them finish it
      study._storage.set_trial_state_values(t._trial_id, TrialState.FAIL)
    except UpdateFinishedTrialError:
      continue
    study.enqueue_trial(dict(t.params), user_attrs={DIR_ATTR: name, RETRY_ATTR: t.number})
    logging.info("trial %d lost its worker: queued again in %s", t.number, name)
    recovered.append(t.number)
  return recovered


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
