"""Fine-tunes a pretrained run or Hugging Face model: `launch.train` with --init_from
required, printing the held-out measures at the end.

  python -m launch.finetune --config experiments/finetune_genre.py \
      --init_from runs/mlm_tiny --workdir runs/genre [--config.train.steps=500 ...]

The experiment's `objective.kind` (sft, dpo, classification, regression, qa) says what
to train; the architecture and tokenizer come from --init_from. Checkpoints go to
WORKDIR/checkpoints, the held-out measures to WORKDIR/results.json, and running the
same command again resumes. Multi-process runs take the flags of launch.train (or
launch.local / SLURM / TPU).
"""

from __future__ import annotations

import json

import jax
from absl import app, flags

from launch import train as train_launcher
from launch.cli import cli_main, parse_flags
from lmjax import paths

FLAGS = flags.FLAGS


@cli_main
def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  exp = train_launcher.experiment()
  train_launcher.start_runtime(exp)
  train_launcher.train(exp)
  if jax.process_index() == 0:
    results = paths.join(paths.resolve(FLAGS.workdir), "results.json")
    print(json.dumps(json.loads(paths.read_bytes(results)), indent=2))


if __name__ == "__main__":
  flags.mark_flags_as_required(["config", "init_from", "workdir"])
  app.run(main, flags_parser=parse_flags)
