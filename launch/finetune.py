"""Fine-tunes a pretrained run or Hugging Face model on a classification, regression or QA
task, with the pretraining loop: the same mesh, FSDP, checkpoints, preemption and resume.

  python -m launch.finetune --config experiments/finetune_genre.py \
      --init_from runs/mlm_tiny --workdir runs/genre [--config.train.steps=500 ...]

Prints the held-out measures and writes them to WORKDIR/results.json; checkpoints
go to WORKDIR/checkpoints, and running the same command again resumes.
Multi-process runs take the flags of launch.train (or launch.local / SLURM / TPU).
"""

from __future__ import annotations

import json

from absl import app, flags
from ml_collections import config_flags

from launch.cli import cli_main, parse_flags
from lmjax import distributed

config_flags.DEFINE_config_file("config", None, "fine-tuning experiment, e.g. "
                                "experiments/finetune_genre.py[:random]")
flags.DEFINE_string("init_from", None, "an lmjax run directory or a Hugging Face directory")
flags.DEFINE_string("workdir", None, "directory for checkpoints, metrics and results.json")
flags.DEFINE_string("coordinator_address", "", "host:port of process 0 (multi-process runs)")
flags.DEFINE_integer("num_processes", 0, "number of processes (multi-process runs)", lower_bound=0)
flags.DEFINE_integer("process_id", -1, "this process's index (multi-process runs)", lower_bound=-1)
flags.DEFINE_integer("cpu_devices", 0, "simulated CPU devices per process (0: default)",
                     lower_bound=0)
flags.mark_flags_as_required(["config", "init_from", "workdir"])
FLAGS = flags.FLAGS


@cli_main
def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  from lmjax.finetune import finetune, finetune_from_dict
  exp = finetune_from_dict(FLAGS.config.to_dict())
  distributed.apply_runtime(exp.runtime)
  distributed.initialize(distributed.DistributedConfig.from_env(
      coordinator_address=FLAGS.coordinator_address, num_processes=FLAGS.num_processes,
      process_id=FLAGS.process_id, cpu_devices=FLAGS.cpu_devices))
  result = finetune(exp, FLAGS.init_from, FLAGS.workdir)
  print(json.dumps(result, indent=2))


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
