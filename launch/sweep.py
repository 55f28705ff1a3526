"""Runs a hyperparameter sweep: every trial an ordinary training run in DIR/<trial>/.

  python -m launch.sweep --config experiments/clm_tiny.py \
      --sweep experiments/sweeps/lr_tiny.py --workdir runs/sweep \
      [--backend local|slurm|print] [--parallel N] [-- --config.train.steps=100 ...]

Arguments after `--` go to every trial. Running it again skips finished trials
and resumes unfinished ones; summary.csv, summary.md and loss_curves.png are
rewritten from the trials' metrics.
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
from lmjax import paths
from lmjax.cluster.slurm import SlurmJob, sbatch_script, write_and_submit
from lmjax.sweep import load_sweep, read_trial, summarize, trial_args

flags.DEFINE_string("config", None, "experiment file every trial starts from")
flags.DEFINE_string("sweep", None, "sweep file defining get_sweep()")
flags.DEFINE_string("workdir", None, "sweep directory; trial i runs in DIR/<trial-name>")
flags.DEFINE_enum("backend", "local", ["local", "slurm", "print"],
                  "local: run here; slurm: one sbatch job per trial; print: show commands")
flags.DEFINE_integer("parallel", 1, "local trials at once", lower_bound=1)
flags.DEFINE_integer("gpus_per_trial", 1, "slurm: GPUs per trial", lower_bound=1)
flags.DEFINE_string("partition", "", "slurm: partition")
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
    paths.write_atomic(paths.join(trial_dir, "sweep_done.json"), json.dumps(read_trial(trial_dir)))
  return code


def _job_dir(workdir: str, trial: str) -> str:
  """Where slurm reads a trial's script and writes its log: a local (shared) path, so for a
  bucket workdir, ./sweep_jobs/TRIAL."""
  return os.path.join("sweep_jobs", trial) if paths.is_remote(workdir) else os.path.join(
      workdir, trial)


@cli_main
def main(argv: list[str]) -> None:
  trials = load_sweep(FLAGS.sweep).trials()
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


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
