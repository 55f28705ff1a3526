"""Runs a hyperparameter sweep: every trial an ordinary training run in DIR/<trial>/.

  python -m launch.sweep --config experiments/clm_tiny.py \
      --sweep experiments/sweeps/lr_tiny.py --workdir runs/sweep \
      [--backend local|slurm|print] [--parallel N] [-- --config.train.steps=100 ...]

Arguments after `--` go to every trial. Running it again skips finished trials and
resumes unfinished ones; summary.csv, summary.md and loss_curves.png are rewritten from
the trials' metrics.

A sweep file returning an `lmjax.sweep.Search` runs an Optuna study instead:

  python -m launch.sweep --config experiments/clm_tiny.py \
      --sweep experiments/sweeps/lr_optuna.py --workdir runs/search [--workers 2] \
      [--storage postgresql://user@host/db | sqlite:///path.db | journal:///shared/study.log] \
      [--backend local|slurm|print]

Each worker draws trials from the study (default: DIR/study.db) until it holds the
search's number of complete and pruned trials; every trial draws with its own seed, so
workers, machines and reruns try different points. Run the same command again, on any
machine, to add workers or to carry on after a kill: interrupted trials resume from their
checkpoints once their heartbeat is older than --grace_seconds.
"""

from __future__ import annotations

import sys

from absl import app, flags

from launch.cli import cli_main, parse_flags
from lmjax import paths
from lmjax.sweep.files import load_sweep
from lmjax.sweep.run import SweepOptions, run_sweep

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
flags.DEFINE_float("heartbeat_seconds", 10.0, "how often a worker marks its trial (and the "
                   "trial directory's lock) alive", lower_bound=0.1)
flags.DEFINE_float("grace_seconds", 60.0, "a running trial whose heartbeat is older than "
                   "this lost its worker: resumed by the next one (a search), its directory's "
                   "lock taken over", lower_bound=0.1)
flags.mark_flags_as_required(["config", "sweep", "workdir"])
FLAGS = flags.FLAGS


@cli_main
def main(argv: list[str]) -> None:
  spec = load_sweep(FLAGS.sweep)
  opts = SweepOptions(
      config=FLAGS.config, sweep=FLAGS.sweep, workdir=FLAGS.workdir, extra=tuple(argv[1:]),
      backend=FLAGS.backend, parallel=FLAGS.parallel, gpus_per_trial=FLAGS.gpus_per_trial,
      partition=FLAGS.partition, workers=FLAGS.workers, storage=FLAGS.storage,
      study_name=FLAGS.study_name, heartbeat_s=FLAGS.heartbeat_seconds,
      grace_s=FLAGS.grace_seconds)
  outcome = run_sweep(spec, opts)
  for line in outcome.lines:
    print(line)
  if outcome.rows:
    print(paths.read_bytes(paths.join(paths.resolve(FLAGS.workdir), "summary.md")).decode())
    # A search's best is complete (a pruned trial stopped early); a grid's may be unfinished.
    ranked = [r for r in outcome.rows if r["curve"] and r["status"] in ("complete", "unfinished")]
    if ranked:
      best = ranked[0]
      print(f"best: {best['trial']} {best['overrides']} "
            f"(best eval loss {best['best_eval_loss']:.4f})")
  if outcome.failed:
    print(f"failed trials (see their train.log): {', '.join(outcome.failed)}", file=sys.stderr)
    sys.exit(1)


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
