"""Runs a sweep file: a `Sweep`'s trials here (a thread pool), as SLURM jobs or as printed
commands; a `Search`'s workers here, as a SLURM array job or as a printed command."""

from __future__ import annotations

import concurrent.futures
import dataclasses
import os
import shlex
from typing import Any

from absl import logging

from lmjax import paths
from lmjax.errors import UserError
from lmjax.sweep import study as study_lib
from lmjax.sweep.files import load_experiment_config
from lmjax.sweep.grid import Sweep
from lmjax.sweep.report import read_trial_metrics, write_study_summary, write_summary
from lmjax.sweep.search import Search
from lmjax.sweep.trials import ROOT, run_trial, trial_args
from lmjax.sweep.worker import run_worker


@dataclasses.dataclass(frozen=True)
class SweepOptions:
  """launch.sweep's flags."""
  config: str  # the experiment file every trial starts from (`file.py[:ARG]`)
  sweep: str  # the sweep file
  workdir: str
  extra: tuple[str, ...] = ()  # launch.train arguments given to every trial
  backend: str = "local"  # local | slurm | print
  parallel: int = 1  # grid: trials at once here
  gpus_per_trial: int = 1
  partition: str = ""
  workers: int = 1  # search: workers here (slurm: array tasks)
  storage: str | None = None  # search: the study's database (default DIR/study.db)
  study_name: str | None = None  # search: default the directory's name
  heartbeat_s: float = 10.0
  grace_s: float = 60.0


@dataclasses.dataclass
class Outcome:
  lines: list[str]  # commands printed or jobs submitted (slurm, print)
  rows: list[dict[str, Any]]  # the summary's rows, best first (empty: nothing ran here)
  failed: list[str]  # trials whose run failed (see their train.log)


def run_sweep(spec: Sweep | Search, opts: SweepOptions) -> Outcome:
  if isinstance(spec, Search):
    return run_search(spec, opts)
  return run_grid(spec, opts)


def run_grid(sweep: Sweep, opts: SweepOptions) -> Outcome:
  """Every unfinished trial of `sweep`: trained here, submitted or printed."""
  sweep.check()
  trials = sweep.trials()
  workdir = _workdir(opts)
  todo = [t for t in trials if not read_trial_metrics(paths.join(workdir, t.name))["done"]]
  logging.info("%d trials, %d finished, %d to run", len(trials), len(trials) - len(todo),
               len(todo))
  args = {t.name: trial_args(opts.config, t.name, t.overrides, workdir, opts.extra)
          for t in todo}
  lines, failed = [], []
  if opts.backend == "print":
    lines = [shlex.join(["python", "-m", "launch.train", *args[t.name]]) for t in todo]
  elif opts.backend == "slurm":
    lines = [_submit(opts, t.name, ["python", "-m", "launch.train", *args[t.name]], array=0)
             for t in todo]
  else:
    with concurrent.futures.ThreadPoolExecutor(opts.parallel) as pool:
      codes = list(pool.map(lambda t: run_trial(args[t.name], paths.join(workdir, t.name),
                                                opts.heartbeat_s, opts.grace_s), todo))
    failed = [t.name for t, code in zip(todo, codes) if code]
  return Outcome(lines, write_summary(workdir, trials), failed)


def run_search(search: Search, opts: SweepOptions) -> Outcome:
  """The Optuna study: workers here (local), an array job (slurm) or their command (print)."""
  import optuna
  optuna.logging.set_verbosity(optuna.logging.WARNING)  # a line per trial otherwise
  search.check()
  search.check_keys(load_experiment_config(opts.config))
  if opts.storage is None and paths.is_remote(opts.workdir):
    raise UserError("a bucket sweep directory cannot hold the SQLite study: give --storage")
  workdir = _workdir(opts)
  storage = opts.storage or study_lib.default_storage(workdir)
  name = opts.study_name or os.path.basename(workdir.rstrip("/"))
  study = study_lib.open_study(search, study_lib.make_storage(storage), name)
  if opts.backend != "local":
    worker = ["python", "-m", "launch.sweep", f"--config={opts.config}", f"--sweep={opts.sweep}",
              f"--workdir={workdir}", f"--storage={storage}", f"--study_name={name}",
              "--backend=local", "--workers=1", f"--heartbeat_seconds={opts.heartbeat_s}",
              f"--grace_seconds={opts.grace_s}", "--", *opts.extra]
    line = (shlex.join(worker) if opts.backend == "print" else
            _submit(opts, "workers", worker, array=opts.workers))  # one worker per task
    return Outcome([line], [], [])
  logging.info("study %s in %s: %s", name, storage, study_lib.counts(study) or "new")

  def train(overrides: dict, dirname: str, link: dict) -> int:
    import json
    args = trial_args(opts.config, dirname, overrides, workdir, opts.extra)
    return run_trial([*args, f"--optuna_trial={json.dumps(link)}"],
                     paths.join(workdir, dirname), opts.heartbeat_s, opts.grace_s)
  with concurrent.futures.ThreadPoolExecutor(opts.workers) as pool:
    failed = sum(pool.map(lambda _: run_worker(search, storage, name, workdir, train,
                                               opts.heartbeat_s, opts.grace_s),
                          range(opts.workers)), [])
  return Outcome([], write_study_summary(study, workdir), failed)


def _workdir(opts: SweepOptions) -> str:
  workdir = paths.resolve(opts.workdir)
  paths.check_access(workdir, write=True)
  paths.makedirs(workdir)
  return workdir


def _submit(opts: SweepOptions, name: str, command: list[str], array: int) -> str:
  """One sbatch job (`array`: tasks of an array job); its script and log in a local,
  shared directory (./sweep_jobs/NAME for a bucket sweep directory)."""
  from lmjax.cluster.slurm import SlurmJob, sbatch_script, write_and_submit
  job_dir = (os.path.join("sweep_jobs", name) if paths.is_remote(opts.workdir)
             else os.path.join(paths.resolve(opts.workdir), name))
  job = SlurmJob(job_name="lmjax-search" if array else name, nodes=1,
                 gpus_per_node=opts.gpus_per_trial, partition=opts.partition, log_dir=job_dir,
                 **({"process_per": "node", "array": array} if array else {}))
  return write_and_submit(sbatch_script(job, command, ROOT), os.path.join(job_dir, "job.sbatch"),
                          True)
