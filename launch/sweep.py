"""Runs a hyperparameter sweep: every trial an ordinary training run in DIR/<trial>/.

  python -m launch.sweep --config experiments/clm_tiny.py \
      --sweep experiments/sweeps/lr_tiny.py --workdir runs/sweep \
      [--backend local|slurm|print] [--parallel N] [-- --config.train.steps=100 ...]

Arguments after `--` go to every trial. Running it again skips finished trials
and resumes unfinished ones; summary.csv, summary.md and loss_curves.png are
rewritten from the trials' metrics.

A sweep file returning an `lmjax.search.Search` runs an Optuna study instead:

  python -m launch.sweep --config experiments/clm_tiny.py \
      --sweep experiments/sweeps/lr_optuna.py --workdir runs/search [--workers 2] \
      [--storage postgresql://user@host/db | sqlite:///path.db | journal:///shared/study.log] \
      [--backend local|slurm|print]

Each worker draws trials from the study (default: DIR/study.db) until it holds the
search's number of complete and pruned trials. Run the same command again, on any
machine, to add workers or to carry on after a kill: interrupted trials resume from
their checkpoints once their heartbeat is older than --grace_seconds.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import shlex
import subprocess
import sys

from absl import app, flags, logging

from launch.cli import cli_main, parse_flags
from lmjax.errors import UserError
from lmjax import paths
from lmjax.cluster.slurm import SlurmJob, sbatch_script, write_and_submit
from lmjax.search import Search
from lmjax.sweep import Trial, load_sweep, read_trial, summarize, trial_args

flags.DEFINE_string("config", None, "experiment file every trial starts from")
flags.DEFINE_string("sweep", None, "sweep file defining get_sweep()")
flags.DEFINE_string("workdir", None, "sweep directory; trial i runs in DIR/<trial-name>")
flags.DEFINE_enum("backend", "local", ["local", "slurm", "print"],
                  "local: run here; slurm: one sbatch job per trial; print: show commands")
flags.DEFINE_integer("parallel", 1, "local trials at once", lower_bound=1)
flags.DEFINE_integer("gpus_per_trial", 1, "slurm: GPUs per trial", lower_bound=1)
flags.DEFINE_string("partition", "", "slurm: partition")
flags.DEFINE_integer("workers", 1, "search: local workers drawing trials from the study "
                     "(slurm: array tasks, one worker each)", lower_bound=1)
flags.DEFINE_string("storage", None, "search: the study's database (default: "
                    "sqlite:///DIR/study.db); postgresql://, mysql:// or journal:///FILE")
flags.DEFINE_string("study_name", None, "search: the study's name (default: DIR's name)")
flags.DEFINE_float("heartbeat_seconds", 10.0, "search: how often a worker marks its trial "
                   "alive", lower_bound=0.1)
flags.DEFINE_float("grace_seconds", 60.0, "search: a running trial whose heartbeat is older "
                   "than this is resumed by the next worker", lower_bound=0.1)
flags.mark_flags_as_required(["config", "sweep", "workdir"])
FLAGS = flags.FLAGS
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_trial(args: list[str], trial_dir: str) -> int:
  """Runs one trial; its train.log is appended locally (a bucket's copy is uploaded after)."""
  log_dir = paths.local_staging(trial_dir)
  paths.makedirs(log_dir)
  log_path = os.path.join(log_dir, "train.log")
  if log_dir != trial_dir and paths.exists(paths.join(trial_dir, "train.log")):
    with open(log_path, "wb") as f:  # an earlier attempt's log, continued
      f.write(paths.read_bytes(paths.join(trial_dir, "train.log")))
  with open(log_path, "a") as log:
    code = subprocess.run([sys.executable, "-m", "launch.train", *args], cwd=REPO,
                          stdout=log, stderr=subprocess.STDOUT).returncode
  if log_dir != trial_dir:
    paths.put_file(log_path, paths.join(trial_dir, "train.log"))
    paths.remove_local_staging(log_dir, trial_dir)
  if code == 0:
    done = {**read_trial(trial_dir), "done": True}  # read before this file exists
    paths.write_atomic(paths.join(trial_dir, "sweep_done.json"), json.dumps(done))
  return code


def _job_dir(workdir: str, trial: str) -> str:
  """Where slurm reads a trial's script and writes its log: a local (shared) path, so for a
  bucket workdir, ./sweep_jobs/TRIAL."""
  return os.path.join("sweep_jobs", trial) if paths.is_remote(workdir) else os.path.join(
      workdir, trial)


@cli_main
def main(argv: list[str]) -> None:
  spec = load_sweep(FLAGS.sweep)
  if isinstance(spec, Search):
    run_search(spec, argv[1:])
    return
  trials = spec.trials()
  workdir = paths.resolve(FLAGS.workdir)
  paths.check_access(workdir, write=True)
  paths.makedirs(workdir)
  todo = [t for t in trials if not read_trial(paths.join(workdir, t.name))["done"]]
  logging.info("%d trials, %d finished, %d to run", len(trials), len(trials) - len(todo), len(todo))
  args = {t.name: trial_args(FLAGS.config, t, workdir, argv[1:]) for t in todo}
  failed = []
  if FLAGS.backend == "print":
    for t in todo:
      print(shlex.join(["python", "-m", "launch.train", *args[t.name]]))
  elif FLAGS.backend == "slurm":
    for t in todo:
      job = SlurmJob(job_name=t.name, nodes=1, gpus_per_node=FLAGS.gpus_per_trial,
                     partition=FLAGS.partition, log_dir=_job_dir(workdir, t.name))
      script = sbatch_script(job, ["python", "-m", "launch.train", *args[t.name]], REPO)
      print(write_and_submit(script, os.path.join(_job_dir(workdir, t.name), "job.sbatch"), True))
  else:
    with concurrent.futures.ThreadPoolExecutor(FLAGS.parallel) as pool:
      codes = pool.map(lambda t: run_trial(args[t.name], paths.join(workdir, t.name)), todo)
      failed = [t.name for t, code in zip(todo, codes) if code]
  rows = summarize(workdir, trials)
  print(paths.read_bytes(paths.join(workdir, "summary.md")).decode())
  if rows and rows[0]["curve"]:
    print(f"best: {rows[0]['trial']} (best eval loss {rows[0]['best_eval_loss']:.4f})")
  if failed:
    print(f"failed trials (see their train.log): {', '.join(failed)}", file=sys.stderr)
    sys.exit(1)


def run_search(search: Search, extra: list[str]) -> None:
  """The Optuna study: workers here (local), an array job (slurm) or their command (print)."""
  import optuna
  from lmjax import search as search_lib
  optuna.logging.set_verbosity(optuna.logging.WARNING)  # a line per trial otherwise
  search.check()
  search.check_keys(_experiment_config(FLAGS.config))
  workdir = paths.resolve(FLAGS.workdir)
  if FLAGS.storage is None and paths.is_remote(workdir):
    raise UserError("a bucket sweep directory cannot hold the SQLite study: give --storage")
  paths.check_access(workdir, write=True)
  paths.makedirs(workdir)
  storage = FLAGS.storage or search_lib.default_storage(workdir)
  name = FLAGS.study_name or os.path.basename(workdir.rstrip("/"))
  study = search_lib.open_study(search, search_lib.make_storage(storage), name)
  worker = ["python", "-m", "launch.sweep", f"--config={FLAGS.config}", f"--sweep={FLAGS.sweep}",
            f"--workdir={workdir}", f"--storage={storage}", f"--study_name={name}",
            "--backend=local", "--workers=1", "--", *extra]
  if FLAGS.backend != "local":
    _submit_workers(worker, workdir)
    return
  logging.info("study %s in %s: %s", name, storage, search_lib.counts(study) or "new")

  def trial(overrides: dict, dirname: str, link: dict) -> int:
    args = trial_args(FLAGS.config, Trial(dirname, overrides), workdir, extra)
    return run_trial([*args, f"--optuna_trial={json.dumps(link)}"], paths.join(workdir, dirname))
  with concurrent.futures.ThreadPoolExecutor(FLAGS.workers) as pool:
    failed = sum(pool.map(lambda _: search_lib.run_worker(
        search, storage, name, workdir, trial, FLAGS.heartbeat_seconds, FLAGS.grace_seconds),
        range(FLAGS.workers)), [])
  rows = search_lib.summarize_study(study, workdir)
  print(paths.read_bytes(paths.join(workdir, "summary.md")).decode())
  finished = [r for r in rows if r["status"] == "complete"]
  if finished:
    print(f"best: {finished[0]['trial']} {finished[0]['overrides']} "
          f"(best eval loss {finished[0]['best_eval_loss']:.4f})")
  if failed:
    print(f"failed trials (see their train.log): {', '.join(failed)}", file=sys.stderr)
    sys.exit(1)


def _submit_workers(worker: list[str], workdir: str) -> None:
  """--backend print: the worker command; slurm: an array job of --workers tasks."""
  if FLAGS.backend == "print":
    print(shlex.join(worker))
    return
  job = SlurmJob(job_name="lmjax-search", nodes=1, gpus_per_node=FLAGS.gpus_per_trial,
                 partition=FLAGS.partition, log_dir=_job_dir(workdir, "workers"),
                 process_per="node", array=FLAGS.workers)  # one worker per task
  script = sbatch_script(job, worker, REPO)
  print(write_and_submit(script, os.path.join(_job_dir(workdir, "workers"), "job.sbatch"), True))


def _experiment_config(path: str):
  """The experiment file's ConfigDict (`path[:ARG]`), for checking searched keys."""
  import importlib.util
  file, _, arg = path.partition(":")
  if not os.path.isfile(file):
    raise UserError(f"experiment file not found: {file}")
  spec = importlib.util.spec_from_file_location("lmjax_experiment_file", file)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg) if arg else module.get_config()


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
