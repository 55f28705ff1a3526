"""Optuna searches through launch.sweep: pruning, the study in SQLite and in a real
PostgreSQL server shared by worker processes (two starting together on a new study, a
killed search and its rerun), a killed sweep that resumes its interrupted trial from its
checkpoint, summaries and plots, and bad input."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time

import optuna
import pytest

from lmjax.errors import UserError
from lmjax.sweep import Choice, IntUniform, LogUniform, Search, Uniform
from lmjax.sweep.search import suggest
from tiny import ROOT, TINY_OVERRIDES


def _overrides(tmp_path, steps: int, eval_every: int) -> list[str]:
  changes = dict(TINY_OVERRIDES, **{"train.steps": steps, "train.eval_every": eval_every,
                                    "train.checkpoint_every": eval_every,
                                    "optimizer.warmup_steps": 0,
                                    "data.cache_dir": str(tmp_path / "cache")})
  return [f"--config.{k}={v}" for k, v in changes.items()]


def _sweep_file(tmp_path, body: str, name: str = "search.py") -> str:
  path = tmp_path / name
  path.write_text("from lmjax.sweep import Choice, IntUniform, LogUniform, Search, Uniform\n\n"
                  f"def get_sweep():\n  return {body}\n")
  return str(path)


def _sweep_args(sweep: str, workdir, *flags: str) -> list[str]:
  return [sys.executable, "-m", "launch.sweep", "--config=experiments/clm_tiny.py",
          f"--sweep={sweep}", f"--workdir={workdir}", *flags]


def _run(args: list[str], timeout: float = 600) -> subprocess.CompletedProcess:
  return subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def _study(storage: str, name: str):
  return optuna.load_study(study_name=name, storage=storage)


def test_a_killed_search_resumes_its_trial_prunes_a_bad_one_and_is_summarized(tmp_path):
  """Three queued points: a slow one completes; the search is killed (kill -9 of its group)
  in the second after its first checkpoint; the rerun prunes the third (a learning rate
  that cannot learn) at its first evaluation, then retries the second in its own
  directory from that checkpoint. (One search for what were two tests: a pruned trial and
  a killed search's resume.)"""
  sweep = _sweep_file(tmp_path, (
      'Search(space={"optimizer.learning_rate": LogUniform(1e-7, 1e-2)}, sampler="tpe", '
      'pruner="median", num_trials=3, seed=3, pruner_options={"n_startup_trials": 1}, '
      'enqueue=[{"optimizer.learning_rate": 1e-3}, {"optimizer.learning_rate": 5e-3}, '
      '{"optimizer.learning_rate": 1e-7}])'))
  workdir = tmp_path / "search"
  args = _sweep_args(sweep, workdir, "--heartbeat_seconds=0.5", "--grace_seconds=3", "--",
                     *_overrides(tmp_path, 40, 10))
  proc = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                          start_new_session=True)
  try:
    second = workdir / "trial_0001" / "checkpoints"
    deadline = time.monotonic() + 300
    while not (second.is_dir() and "10" in os.listdir(second)) and time.monotonic() < deadline:
      assert proc.poll() is None
      time.sleep(0.2)
  finally:
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(60)
  assert "40" not in os.listdir(second)
  again = _run(args)
  assert again.returncode == 0, again.stderr[-3000:]
  study = _study(f"sqlite:///{workdir}/study.db", "search")
  by_dir: dict[str, list[str]] = {}
  for t in study.trials:
    by_dir.setdefault(t.user_attrs["lmjax_dir"], []).append(t.state.name)
  # the queued third point ran before the retry (number 3), which kept its directory; the
  # retry (a faster rate than the first) beats the median at each evaluation: not pruned
  assert by_dir == {"trial_0000": ["COMPLETE"], "trial_0001": ["FAIL", "COMPLETE"],
                    "trial_0002": ["PRUNED"]}
  log = (workdir / "trial_0001" / "train.log").read_text()
  assert "resumed from" in log and "step 10" in log.split("resumed from")[1].splitlines()[0]
  first, retry = (t for t in study.trials if t.state.name == "COMPLETE")
  assert sorted(first.intermediate_values) == [10, 20, 30, 40]
  assert sorted(retry.intermediate_values) == [10, 20, 30, 40]  # the first attempt's 10 too
  assert first.value == pytest.approx(first.intermediate_values[40])
  # the pruned trial stopped at its first evaluation, its checkpoint written
  assert json.loads((workdir / "trial_0002" / "pruned.json").read_text())["step"] == 10
  assert sorted(os.listdir(workdir / "trial_0002" / "checkpoints")) == ["10"]
  rows = list(csv.DictReader(open(workdir / "summary.csv")))
  assert sorted((r["trial"], r["status"]) for r in rows) == [
      ("trial_0000", "complete"), ("trial_0001", "complete"), ("trial_0002", "pruned")]
  for plot in ("optimization_history.png", "param_importances.png"):
    assert (workdir / plot).read_bytes()[:4] == b"\x89PNG"
  best = [r["trial"] for r in rows if r["status"] == "complete"][0]  # rows: best eval loss first
  assert f"best: {best} " in again.stdout
  # Again, in this process (launch.sweep's main is this call): the study is done, nothing runs.
  from lmjax.sweep.files import load_sweep
  from lmjax.sweep.run import SweepOptions, run_sweep
  done = run_sweep(load_sweep(sweep), SweepOptions(
      config=os.path.join(ROOT, "experiments", "clm_tiny.py"), sweep=sweep, workdir=str(workdir),
      extra=tuple(_overrides(tmp_path, 40, 10))))
  assert not done.failed and sorted(r["trial"] for r in done.rows) == sorted(by_dir)
  assert len(_study(f"sqlite:///{workdir}/study.db", "search").trials) == 4


@pytest.fixture(scope="session")
def postgres(tmp_path_factory):
  """A PostgreSQL server from pip (pgserver), once per test session."""
  import pgserver
  server = pgserver.get_server(str(tmp_path_factory.mktemp("pg")), cleanup_mode="stop")
  yield server.get_uri().replace("postgresql://", "postgresql+psycopg://")
  server.cleanup()


def _dashboard(storage: str) -> tuple[subprocess.Popen, int]:
  """optuna-dashboard serving `storage`, and its port."""
  import socket
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  serve = f"import optuna_dashboard as d; d.run_server({storage!r}, '127.0.0.1', {port})"
  return subprocess.Popen([sys.executable, "-c", serve], stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL), port


def _served_studies(port: int) -> list[str]:
  """The studies the dashboard on `port` lists."""
  import httpx
  deadline, answer = time.monotonic() + 60, None
  while answer is None and time.monotonic() < deadline:
    try:
      answer = httpx.get(f"http://127.0.0.1:{port}/api/studies", timeout=5).json()
    except httpx.TransportError:
      time.sleep(0.3)
  assert answer
  return [s["study_name"] for s in answer["study_summaries"]]


def _trainers(pid: int) -> list[int]:
  """The launch.train processes `pid` started."""
  out = []
  for entry in os.listdir("/proc"):
    try:
      with open(f"/proc/{entry}/stat") as f:
        parent = int(f.read().rpartition(")")[2].split()[1])
      with open(f"/proc/{entry}/cmdline", "rb") as f:
        command = f.read()
    except (OSError, ValueError, IndexError):
      continue
    if parent == pid and b"launch.train" in command:
      out.append(int(entry))
  return out


def _distinct_points(study) -> list:
  """Complete and pruned trials, each with parameters no other one has."""
  done = [t for t in study.trials if t.state.name in ("COMPLETE", "PRUNED")]
  points = [tuple(sorted(t.params.items())) for t in done]
  assert len(set(points)) == len(points), sorted(points)
  return done


def test_workers_a_killed_search_and_other_machines_never_train_one_point_twice(tmp_path,
                                                                                 postgres):
  """Two machines (processes) start together on a new PostgreSQL study and share it (the
  dashboard serves it); then a search's two local workers draw TPE's model points from its
  history, the search is killed with kill -9 (its trainers die with it) and rerun, the
  killed two retried: every complete trial its own point."""
  space = ('space={"optimizer.learning_rate": LogUniform(1e-3, 1e-2), '
           '"optimizer.warmup_steps": IntUniform(0, 4)}, sampler="tpe", pruner="none", '
           'sampler_options={"n_startup_trials": 2}')
  two = _sweep_file(tmp_path, f"Search({space}, num_trials=2)", "two.py")
  workdir = tmp_path / "many"
  flags = [f"--storage={postgres}", "--study_name=many", "--heartbeat_seconds=0.5",
           "--grace_seconds=3", "--", *_overrides(tmp_path, 20, 10)]
  machines = [subprocess.Popen(_sweep_args(two, workdir, *flags), cwd=ROOT,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
              for _ in range(2)]
  outs = [m.communicate(timeout=600) for m in machines]
  assert all(m.returncode == 0 for m in machines), [o[1][-2000:] for o in outs]
  complete = [t for t in _study(postgres, "many").trials if t.state.name == "COMPLETE"]
  assert 2 <= len(complete) <= 3  # both may ask at once for the last one
  assert len({t.user_attrs["lmjax_dir"] for t in complete}) == len(complete)
  dash, port = _dashboard(postgres)  # it starts while the search runs; asked at the end
  try:
    _kill_and_rerun(tmp_path, workdir, space, flags, len(complete))
    assert _served_studies(port) == ["many"]
  finally:
    dash.kill()
    dash.wait(30)
  study = _study(postgres, "many")
  states = [t.state.name for t in study.trials]
  assert states.count("FAIL") == 2 and states.count("COMPLETE") == len(complete) + 2
  done = _distinct_points(study)
  by_number = {t.number: t for t in study.trials}
  retries = [t for t in study.trials if "lmjax_retry_of" in t.user_attrs]
  assert len(retries) == 2  # the two killed trials, each run again in its own directory
  for t in retries:
    first = by_number[t.user_attrs["lmjax_retry_of"]]
    assert first.state.name == "FAIL" and t.params == first.params
    assert t.user_attrs["lmjax_dir"] == first.user_attrs["lmjax_dir"]
  assert all((workdir / t.user_attrs["lmjax_dir"] / "checkpoints" / "20").is_dir() for t in done)
  assert (workdir / "param_importances.png").read_bytes()[:4] == b"\x89PNG"


def _kill_and_rerun(tmp_path, workdir, space: str, flags: list[str], complete: int) -> None:
  """Two more trials: a search's two workers, killed with kill -9 as they start (their
  trainers die with it), then the search again, which retries both."""
  from lmjax import process
  more = _sweep_file(tmp_path, f"Search({space}, num_trials={complete + 2})", "more.py")
  search = subprocess.Popen(_sweep_args(more, workdir, "--workers=2", *flags), cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
  try:
    deadline, trainers = time.monotonic() + 300, []
    while len(trainers) < 2 and time.monotonic() < deadline:
      assert search.poll() is None
      trainers = _trainers(search.pid)
      time.sleep(0.2)
    assert len(trainers) == 2
    os.kill(search.pid, signal.SIGKILL)  # the search alone: its trainers must follow
    search.wait(60)
    # At once: they were just starting (imports and compilation alone take longer), so a
    # trainer that outlived its worker would still be alive here.
    deadline = time.monotonic() + 10
    while any(map(process.alive, trainers)) and time.monotonic() < deadline:
      time.sleep(0.1)
    assert not any(map(process.alive, trainers))
    killed = time.monotonic()
  finally:
    os.killpg(search.pid, signal.SIGKILL)
  # Past the grace period: the rerun finds both killed trials lost (a rerun sooner would see
  # the study's last two trials still running, and stop at once).
  time.sleep(max(0.0, killed + 4 - time.monotonic()))
  again = _run(_sweep_args(more, workdir, "--workers=2", *flags))
  assert again.returncode == 0, again.stderr[-3000:]


def test_a_trial_directory_held_by_a_live_process_is_not_trained_until_it_is_free(tmp_path):
  """A worker that finds its trial's directory held (another worker on another machine
  still trains it) waits; once the holder is dead it trains there."""
  import threading

  from lmjax.sweep.trials import run_trial
  trial_dir = tmp_path / "trial_0000"
  hold = ("import sys, time; from lmjax.run_lock import RunLock\n"
          "RunLock(sys.argv[1], 0.2, 2).acquire(); print('held', flush=True); time.sleep(600)")
  holder = subprocess.Popen([sys.executable, "-c", hold, str(trial_dir)], cwd=ROOT,
                            stdout=subprocess.PIPE, text=True)
  codes = []
  try:
    assert holder.stdout.readline().strip() == "held"
    worker = threading.Thread(target=lambda: codes.append(run_trial(
        ["--config=/nonexistent/experiment.py", f"--workdir={trial_dir}"], str(trial_dir),
        heartbeat_s=0.2, grace_s=2)))
    worker.start()
    time.sleep(4)  # twice the grace: a live holder's lock does not go stale
    assert worker.is_alive() and not (trial_dir / "train.log").exists()
  finally:
    holder.kill()
    holder.wait(30)
  worker.join(120)
  assert codes == [2]  # it ran launch.train, which refused the missing file in one line
  assert "error:" in (trial_dir / "train.log").read_text()


@pytest.mark.parametrize("search, message", [
    (dict(space={"optimizer.learning_rate": Uniform(1.0, 0.1)}), "empty or inverted range"),
    (dict(space={"optimizer.learning_rate": LogUniform(0.0, 0.1)}), "a log range needs"),
    (dict(space={"optimizer.warmup_steps": IntUniform(0, 10, log=True)}), "a log range needs"),
    (dict(space={"optimizer.warmup_steps": IntUniform(0, 50, step=15)}), "step 15 does not"),
    (dict(space={"optimizer.warmup_steps": IntUniform(0, 60, step=0)}), "step 0 does not"),
    (dict(space={"optimizer.warmup_steps": IntUniform(1, 61, log=True, step=15)}),
     "a log range takes no step"),
    (dict(space={"optimizer.learning_rate": Uniform(0.1, 1.0)}, sampler="cmaes"),
     "unknown sampler 'cmaes'"),
    (dict(space={"optimizer.learning_rate": Uniform(0.1, 1.0)}, pruner="hyperband"),
     "unknown pruner 'hyperband'"),
    (dict(space={"optimizer.learning_rate": Uniform(0.1, 1.0)}, sampler="grid"),
     "the grid sampler needs Choice values"),
    (dict(space={"optimizer.learning_rate": Choice((1e-3, 2e-3))}, sampler="grid",
          num_trials=3), "more than the grid's points"),
    (dict(space={}), "the search space is empty"),
    (dict(space={"optimizer.learning_rate": Uniform(0.1, 1.0)},
          sampler_options={"n_startup": 5}), "sampler_options: .*'n_startup'"),
    (dict(space={"optimizer.learning_rate": Uniform(0.1, 1.0)}, sampler="random",
          sampler_options={"n_startup_trials": 5}), "sampler_options: .*'n_startup_trials'"),
    (dict(space={"optimizer.learning_rate": Uniform(0.1, 1.0)},
          pruner_options={"min_resource": -1}), "pruner_options: .*min_resource"),
])
def test_bad_searches_are_refused(search, message):
  with pytest.raises(UserError, match=message):
    Search(**search).check()


def test_a_stepped_int_range_samples_its_lattice_ends_included():
  study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
  space = {"optimizer.warmup_steps": IntUniform(0, 60, step=15)}
  values = {suggest(study.ask(), space)["optimizer.warmup_steps"] for _ in range(40)}
  assert values == {0, 15, 30, 45, 60}


def test_a_search_key_that_is_not_a_config_field_is_a_one_line_error(tmp_path):
  sweep = _sweep_file(tmp_path, 'Search(space={"optimizer.learnig_rate": Uniform(0.1, 1.0)})')
  proc = _run(_sweep_args(sweep, tmp_path / "s"), timeout=120)
  assert proc.returncode == 2 and "Traceback" not in proc.stderr
  assert "'optimizer.learnig_rate' is not a config field" in proc.stderr.strip().splitlines()[-1]
  assert not (tmp_path / "s" / "study.db").exists()


def test_an_unreachable_storage_is_a_one_line_error(tmp_path):
  sweep = _sweep_file(tmp_path, 'Search(space={"optimizer.learning_rate": Uniform(0.1, 1.0)})')
  proc = _run(_sweep_args(sweep, tmp_path / "s",
                          "--storage=postgresql+psycopg://nobody@127.0.0.1:1/none"), timeout=120)
  assert proc.returncode == 2 and "Traceback" not in proc.stderr
  assert "cannot open the study storage postgresql+psycopg://nobody@127.0.0.1:1/none" in \
      proc.stderr.strip().splitlines()[-1]


def test_the_shipped_search_is_valid_for_clm_tiny():
  from experiments import clm_tiny
  from lmjax.sweep import load_sweep
  search = load_sweep(os.path.join(ROOT, "experiments", "sweeps", "lr_optuna.py"))
  assert isinstance(search, Search) and (search.sampler, search.pruner) == ("tpe", "asha")
  assert set(search.space) == {"optimizer.learning_rate", "optimizer.warmup_steps"}
  search.check()
  search.check_keys(clm_tiny.get_config())
  # ASHA's first rung comes after the longest warm-up (a warming-up trial is misjudged).
  assert search.pruner_options["min_resource"] > search.space["optimizer.warmup_steps"].high
  assert search.fixed["train.eval_every"] == search.pruner_options["min_resource"]


def test_slurm_workers_are_one_array_job_of_single_worker_tasks():
  from lmjax.cluster.slurm import SlurmJob, sbatch_script
  worker = ["python", "-m", "launch.sweep", "--storage=postgresql+psycopg://h/db",
            "--backend=local", "--workers=1"]
  script = sbatch_script(SlurmJob(job_name="lmjax-search", gpus_per_node=8, process_per="node",
                                  array=16), worker, "/repo")
  assert "#SBATCH --array=0-15" in script and "slurm-%A_%a.out" in script
  assert "#SBATCH --ntasks-per-node=1" in script  # one worker per task, all its GPUs
  assert script.strip().endswith("srun --kill-on-bad-exit=1 " + " ".join(worker))
