"""Writes (and with --submit, submits) an sbatch script for a multi-node run.

  python -m launch.slurm --nodes 4 --gpus_per_node 8 --partition gpu \
      --script runs/gpt2/job.sbatch [--submit] -- \
      --config experiments/gpt2_small.py --workdir runs/gpt2
"""

from __future__ import annotations

import os

from absl import app, flags

from launch.cli import cli_main, parse_flags
from lmjax.cluster.slurm import SlurmJob, sbatch_script, write_and_submit

flags.DEFINE_integer("nodes", 1, "nodes", lower_bound=1)
flags.DEFINE_integer("gpus_per_node", 8, "GPUs per node", lower_bound=1)
flags.DEFINE_enum("process_per", "gpu", ["gpu", "node"], "one process per GPU or per node")
flags.DEFINE_string("partition", "", "SLURM partition")
flags.DEFINE_string("account", "", "SLURM account")
flags.DEFINE_string("time", "24:00:00", "time limit")
flags.DEFINE_string("job_name", "lmjax", "job name")
flags.DEFINE_string("setup", "", "shell lines run before srun (module loads, venv activation)")
flags.DEFINE_string("script", "job.sbatch", "where to write the sbatch script")
flags.DEFINE_bool("submit", False, "submit the script with sbatch")
FLAGS = flags.FLAGS
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@cli_main
def main(argv: list[str]) -> None:
  job = SlurmJob(FLAGS.job_name, FLAGS.nodes, FLAGS.gpus_per_node, FLAGS.process_per,
                 FLAGS.partition, FLAGS.account, FLAGS.time,
                 log_dir=os.path.dirname(os.path.abspath(FLAGS.script)), setup=FLAGS.setup)
  script = sbatch_script(job, ["python", "-m", "launch.train", *argv[1:]], REPO)
  print(script)
  answer = write_and_submit(script, FLAGS.script, FLAGS.submit)
  print(f"# wrote {FLAGS.script}" + (f"; sbatch: {answer.strip()}" if answer else ""))


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
