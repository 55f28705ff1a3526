"""A search's workers in one process, with trials that write their metrics at once
instead of training: every worker and every rerun draws its own points, trial n draws the
same random point whoever asks for it, and a grid gives each point to one worker."""

from __future__ import annotations

import dataclasses
import json
import os
import threading

import optuna
import pytest

from lmjax.sweep import Choice, IntUniform, LogUniform, Search
from lmjax.sweep.search import grid_points, trial_seed
from lmjax.sweep.study import DIR_ATTR
from lmjax.sweep.worker import run_worker

optuna.logging.set_verbosity(optuna.logging.WARNING)
SPACE = {"optimizer.learning_rate": LogUniform(1e-4, 1e-1),
         "optimizer.warmup_steps": IntUniform(0, 60)}


def _fake_trainer(workdir: str):
  """A trial that 'trains' in a moment: its eval loss is a function of its point."""
  def run(overrides: dict, name: str, link: dict) -> int:
    os.makedirs(os.path.join(workdir, name), exist_ok=True)
    loss = abs(overrides.get("optimizer.learning_rate", 0.01) - 3e-3) * 100
    with open(os.path.join(workdir, name, "metrics.jsonl"), "w") as f:
      f.write(json.dumps({"split": "eval", "step": 1, "loss": loss}) + "\n")
    threading.Event().wait(0.02)  # let the other worker ask in between
    return 0
  return run


def _workers(search: Search, url: str, workdir: str, n: int) -> None:
  threads = [threading.Thread(target=run_worker, args=(search, url, "s", workdir,
                                                       _fake_trainer(workdir), 0.5, 60))
             for _ in range(n)]
  for t in threads:
    t.start()
  for t in threads:
    t.join(120)
    assert not t.is_alive()


def _points(url: str) -> dict[int, tuple]:
  study = optuna.load_study(study_name="s", storage=url)
  return {t.number: tuple(sorted(t.params.items())) for t in study.trials
          if t.state.name in ("COMPLETE", "PRUNED")}


@pytest.mark.parametrize("sampler, options", [
    ("random", {}), ("tpe", {"n_startup_trials": 3}),
    # GP's own proposals are a deterministic function of the history (it may come back to
    # a point it likes); its random start-up draws are what the seeding decides.
    ("gp", {"n_startup_trials": 10})])
def test_workers_and_reruns_draw_their_own_points(tmp_path, sampler, options):
  url = f"sqlite:///{tmp_path}/study.db"
  search = Search(space=SPACE, sampler=sampler, pruner="none", num_trials=6, seed=7,
                  sampler_options=options)
  _workers(search, url, str(tmp_path), 2)
  first = _points(url)
  assert len(first) >= 6
  # A rerun (new workers, the same seed) asking for more: new points, not the first ones.
  _workers(dataclasses.replace(search, num_trials=10), url, str(tmp_path), 2)
  points = _points(url)
  assert len(points) >= 10 and len(set(points.values())) == len(points), points
  assert all(points[n] == p for n, p in first.items())


def test_trial_n_draws_the_same_random_point_with_one_worker_or_two(tmp_path):
  """What stays reproducible with several workers: each trial number's random draws (all
  of a random search, the start-up trials of TPE and GP)."""
  search = Search(space=SPACE, sampler="tpe", pruner="none", num_trials=6, seed=3,
                  sampler_options={"n_startup_trials": 4})
  one, two = f"sqlite:///{tmp_path}/one.db", f"sqlite:///{tmp_path}/two.db"
  _workers(search, one, str(tmp_path / "one"), 1)
  _workers(search, two, str(tmp_path / "two"), 2)
  alone, shared = _points(one), _points(two)
  assert all(alone[n] == shared[n] for n in range(4))
  again = f"sqlite:///{tmp_path}/again.db"  # one worker: the whole search repeats
  _workers(search, again, str(tmp_path / "again"), 1)
  assert _points(again) == alone
  assert trial_seed(3, 0) != trial_seed(3, 1) != trial_seed(4, 1)


@pytest.mark.parametrize("num_trials", [6, 4])
def test_a_grid_gives_each_point_to_exactly_one_worker(tmp_path, num_trials):
  search = Search(space={"model.num_layers": Choice((1, 2, 3)),
                         "model.num_heads": Choice((2, 4))},
                  sampler="grid", pruner="none", num_trials=num_trials, seed=5)
  url = f"sqlite:///{tmp_path}/study.db"
  _workers(search, url, str(tmp_path), 3)
  _workers(search, url, str(tmp_path), 2)  # a rerun finds nothing left
  study = optuna.load_study(study_name="s", storage=url)
  assert len(study.trials) == num_trials and all(t.state.name == "COMPLETE"
                                                 for t in study.trials)
  tried = sorted((t.params["model.num_layers"], t.params["model.num_heads"])
                 for t in study.trials)
  expected = sorted((p["model.num_layers"], p["model.num_heads"])
                    for p in grid_points(search)[:num_trials])
  assert tried == expected  # the seed's subset of the grid when num_trials is smaller
  assert len({t.user_attrs[DIR_ATTR] for t in study.trials}) == num_trials


def test_a_grid_keeps_its_seed_in_every_worker():
  grid = {"model.num_layers": Choice((1, 2, 3, 4)), "model.num_heads": Choice((2, 4))}
  orders = [grid_points(Search(space=grid, sampler="grid", seed=s)) for s in (0, 0, 1)]
  assert orders[0] == orders[1] != orders[2] and len(orders[0]) == 8



def test_a_lost_heartbeat_does_not_take_a_trial_from_a_live_trainer(tmp_path):
  """A worker that cannot reach the database but still trains keeps its trial: the
  directory's lock says so. Once its holder is dead, the trial is queued again."""
  import subprocess
  import sys

  from lmjax.sweep import study as study_lib
  from tiny import ROOT
  search = Search(space=SPACE, sampler="random", pruner="none", num_trials=2)
  study = study_lib.open_study(search, study_lib.make_storage(f"sqlite:///{tmp_path}/s.db"), "s")
  trial = study.ask()
  trial.set_user_attr(DIR_ATTR, "trial_0000")
  study._storage.set_trial_system_attr(trial._trial_id, study_lib.HEARTBEAT, 0.0)  # long ago
  hold = ("import sys, time; from lmjax.run_lock import RunLock\n"
          "RunLock(sys.argv[1], 0.2, 5).acquire(); print('held', flush=True); time.sleep(600)")
  holder = subprocess.Popen([sys.executable, "-c", hold, str(tmp_path / "trial_0000")],
                            cwd=ROOT, stdout=subprocess.PIPE, text=True)
  try:
    assert holder.stdout.readline().strip() == "held"
    assert study_lib.recover_stale(study, str(tmp_path), grace_s=5) == []
  finally:
    holder.kill()
    holder.wait(30)
  assert study_lib.recover_stale(study, str(tmp_path), grace_s=5) == [0]
  retry = study_lib.pop_queued(study)
  assert retry.user_attrs[DIR_ATTR] == "trial_0000" and retry.number == 1


def test_sweep_files_written_before_the_package_still_load(tmp_path):
  from lmjax.errors import UserError
  from lmjax.sweep import load_sweep
  old = tmp_path / "old.py"
  old.write_text("from lmjax.search import IntUniform, Search\n"
                 "from lmjax.sweep import Choice, LogUniform, Sweep\n\n"
                 "def get_sweep():\n  return Search(space={'optimizer.learning_rate': "
                 "LogUniform(1e-3, 1e-2), 'optimizer.warmup_steps': IntUniform(0, 4)})\n")
  search = load_sweep(str(old))
  assert isinstance(search, Search) and isinstance(search.space["optimizer.warmup_steps"],
                                                   IntUniform)
  search.check()
  wrong = tmp_path / "wrong.py"
  wrong.write_text("def get_sweep():\n  return {'optimizer.learning_rate': [1e-3]}\n")
  with pytest.raises(UserError, match="get_sweep\\(\\) must return lmjax.sweep.Sweep or "
                                      "lmjax.sweep.Search, not dict"):
    load_sweep(str(wrong))
  with pytest.raises(UserError, match="sweep file not found: "):
    load_sweep(str(tmp_path / "missing.py"))
