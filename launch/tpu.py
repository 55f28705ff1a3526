"""Prints (and with --run, runs) the gcloud commands for a run on a TPU pod slice.

  python -m launch.tpu --tpu my-v5p-64 --zone us-east5-a [--project P] [--run] -- \
      --config experiments/llama_1b.py:fsdp --workdir gs://bucket/runs/llama
"""

from __future__ import annotations

import os
import shlex

from absl import app, flags

from launch.cli import cli_main, parse_flags
from lmjax.cluster.tpu import TpuSlice, commands, run

flags.DEFINE_string("tpu", None, "TPU VM (pod slice) name")
flags.DEFINE_string("zone", None, "its zone")
flags.DEFINE_string("project", "", "GCP project (default: gcloud's)")
flags.DEFINE_bool("run", False, "run the commands instead of only printing them")
flags.mark_flags_as_required(["tpu", "zone"])
FLAGS = flags.FLAGS
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@cli_main
def main(argv: list[str]) -> None:
  cmds = commands(TpuSlice(FLAGS.tpu, FLAGS.zone, FLAGS.project), argv[1:], REPO)
  for cmd in cmds:
    print(shlex.join(cmd))
  if FLAGS.run:
    run(cmds)


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
