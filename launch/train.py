"""Pretrains a model from an experiment file.

  python -m launch.train --config experiments/clm_tiny.py --workdir runs/clm \
      [--config.train.steps=2000 ...]

Running the same command again resumes from the newest checkpoint in --workdir.
"""

from __future__ import annotations

from absl import app, flags
from ml_collections import config_flags

from launch.cli import cli_main, parse_flags
from lmjax.experiment import experiment_from_dict
from lmjax.train import train_and_evaluate

config_flags.DEFINE_config_file("config", None, "experiment file, e.g. experiments/clm_tiny.py[:ARG]")
flags.DEFINE_string("workdir", None, "run directory: checkpoints, metrics, TensorBoard logs")
flags.mark_flags_as_required(["config", "workdir"])
FLAGS = flags.FLAGS


@cli_main
def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  train_and_evaluate(experiment_from_dict(FLAGS.config.to_dict()), FLAGS.workdir)


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
