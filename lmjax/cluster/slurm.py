"""sbatch scripts that start one lmjax process per GPU (or per node) under srun.

Inside the job, `lmjax.distributed` sees SLURM_NTASKS > 1 and lets
`jax.distributed.initialize()` read the coordinator, process count and id from
SLURM's variables.
"""

from __future__ import annotations

import dataclasses
import os
import shlex
import subprocess
from typing import Sequence


@dataclasses.dataclass(frozen=True)
class SlurmJob:
  job_name: str = "lmjax"
  nodes: int = 1
  gpus_per_node: int = 8
  process_per: str = "gpu"  # "gpu": one process per GPU; "node": one per node, all its GPUs
  partition: str = ""
  account: str = ""
  time: str = "24:00:00"
  cpus_per_task: int = 8
  log_dir: str = "."  # where slurm-%j.out goes
  setup: str = ""  # shell lines run before srun (module load ..., source venv/bin/activate)
  array: int = 0  # > 0: an array job of this many tasks (a search's workers)


def sbatch_script(job: SlurmJob, command: Sequence[str], repo_dir: str) -> str:
  if job.process_per not in ("gpu", "node"):
    raise ValueError(f"process_per must be 'gpu' or 'node', got {job.process_per!r}")
  per_gpu = job.process_per == "gpu"
  tasks = job.gpus_per_node if per_gpu else 1
  log = "slurm-%A_%a.out" if job.array else "slurm-%j.out"
  lines = ["#!/bin/bash",
           f"#SBATCH --job-name={job.job_name}",
           f"#SBATCH --nodes={job.nodes}",
           f"#SBATCH --ntasks-per-node={tasks}",
           f"#SBATCH --gpus-per-node={job.gpus_per_node}",
           f"#SBATCH --cpus-per-task={job.cpus_per_task}",
           f"#SBATCH --time={job.time}",
           f"#SBATCH --output={os.path.join(job.log_dir, log)}"]
  lines += [f"#SBATCH --array=0-{job.array - 1}"] * bool(job.array)
  lines += [f"#SBATCH --partition={job.partition}"] * bool(job.partition)
  lines += [f"#SBATCH --account={job.account}"] * bool(job.account)
  run = shlex.join(command)  # per-GPU tasks: jax picks device SLURM_LOCALID by itself
  lines += ["set -euo pipefail", f"cd {shlex.quote(repo_dir)}"]
  lines += [job.setup] * bool(job.setup)
  lines += [f"srun --kill-on-bad-exit=1 {run}", ""]
  return "\n".join(lines)


def write_and_submit(script: str, path: str, submit: bool) -> str:
  """Writes the script; with `submit`, hands it to sbatch and returns sbatch's answer."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, "w") as f:
    f.write(script)
  if not submit:
    return ""
  return subprocess.run(["sbatch", path], check=True, capture_output=True, text=True).stdout
