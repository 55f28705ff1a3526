"""Runs a training command as N local processes joined by jax.distributed.

  python -m launch.local --num_processes 2 --devices_per_process 2 -- \
      --config experiments/clm_tiny.py --workdir runs/mp

Everything after `--` goes to `launch.train`. If one process fails, the others
are stopped and the exit status is the failing one's.
"""

from __future__ import annotations

import sys

from absl import app, flags

from launch.cli import cli_main, parse_flags
from lmjax.cluster.local import run_local

flags.DEFINE_integer("num_processes", 2, "processes to start", lower_bound=1)
flags.DEFINE_integer("devices_per_process", 0, "simulated CPU devices per process (0: default)",
                     lower_bound=0)
flags.DEFINE_string("module", "launch.train", "python module each process runs")
FLAGS = flags.FLAGS


@cli_main
def main(argv: list[str]) -> None:
  command = [sys.executable, "-m", FLAGS.module, *argv[1:]]
  sys.exit(run_local(command, FLAGS.num_processes, FLAGS.devices_per_process))


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
