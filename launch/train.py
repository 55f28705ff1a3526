"""Trains a model from an experiment file, on one process or many: pretraining, or
fine-tuning from --init_from (the experiment's `objective.kind` says which).

  python -m launch.train --config experiments/clm_tiny.py --workdir runs/clm \
      [--config.train.steps=2000 ...] [--init_from RUN_OR_HF_DIR]

Running the same command again resumes from the newest checkpoint in --workdir.
Multi-process runs pass --coordinator_address/--num_processes/--process_id (or
the LMJAX_* variables `launch.local` sets); SLURM and TPU pods are detected.
"""

from __future__ import annotations

import json

from absl import app, flags
from ml_collections import config_flags

from launch.cli import cli_main, parse_flags
from lmjax import distributed
from lmjax.experiment import Experiment, experiment_from_dict

config_flags.DEFINE_config_file("config", None, "experiment file, e.g. experiments/clm_tiny.py[:ARG]")
flags.DEFINE_string("workdir", None, "run directory: checkpoints, metrics, TensorBoard logs")
flags.DEFINE_string("coordinator_address", "", "host:port of process 0 (multi-process runs)")
flags.DEFINE_integer("num_processes", 0, "number of processes (multi-process runs)", lower_bound=0)
flags.DEFINE_integer("process_id", -1, "this process's index (multi-process runs)", lower_bound=-1)
flags.DEFINE_integer("cpu_devices", 0, "simulated CPU devices per process (0: default)",
                     lower_bound=0)
flags.DEFINE_integer("heartbeat_timeout", 60, "seconds before a silent peer counts as dead",
                     lower_bound=1)
flags.DEFINE_string("init_from", None, "start a new run from these weights: an lmjax run "
                    "or a Hugging Face directory (same as --config.train.init_from)")
flags.DEFINE_string("optuna_trial", None, "set by launch.sweep for a search's trial (JSON: "
                    "storage, study, trial id, metric, pruner): report each evaluation to it "
                    "and stop when it is pruned")
FLAGS = flags.FLAGS


def experiment() -> Experiment:
  """--config (with --init_from) as the typed experiment; config errors come before any
  device work."""
  config = FLAGS.config.to_dict()
  if FLAGS.init_from:
    config.setdefault("train", {})["init_from"] = FLAGS.init_from
  return experiment_from_dict(config)


def start_runtime(exp: Experiment) -> None:
  distributed.apply_runtime(exp.runtime)
  distributed.initialize(distributed.DistributedConfig.from_env(
      coordinator_address=FLAGS.coordinator_address, num_processes=FLAGS.num_processes,
      process_id=FLAGS.process_id, cpu_devices=FLAGS.cpu_devices,
      heartbeat_timeout_s=FLAGS.heartbeat_timeout))


def train(exp: Experiment) -> dict[str, float]:
  from lmjax.run import train_and_evaluate  # after the runtime is configured
  return train_and_evaluate(exp, FLAGS.workdir, _trial_reporter())


@cli_main
def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  exp = experiment()
  start_runtime(exp)
  train(exp)


def _trial_reporter():
  """--optuna_trial's reporter on process 0; the others follow its decisions."""
  if not FLAGS.optuna_trial:
    return None
  import jax
  if jax.process_index() != 0:
    return lambda step, metrics: False
  from lmjax.sweep.reporter import TrialReporter
  return TrialReporter(json.loads(FLAGS.optuna_trial), FLAGS.workdir)


if __name__ == "__main__":
  flags.mark_flags_as_required(["config", "workdir"])
  app.run(main, flags_parser=parse_flags)
