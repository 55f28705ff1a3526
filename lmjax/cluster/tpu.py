"""gcloud commands that install lmjax on every worker of a TPU pod slice and start a run.

Every worker runs the same command; `jax.distributed.initialize()` discovers the
slice by itself (`lmjax.distributed` detects TPU_WORKER_HOSTNAMES).
"""

from __future__ import annotations

import dataclasses
import shlex
import subprocess
from typing import Sequence


@dataclasses.dataclass(frozen=True)
class TpuSlice:
  name: str
  zone: str
  project: str = ""
  remote_dir: str = "~/lmjax"


def _gcloud(slice_: TpuSlice, verb: str, *args: str) -> list[str]:
  cmd = ["gcloud", "compute", "tpus", "tpu-vm", verb, *args, f"--zone={slice_.zone}",
         "--worker=all"]
  return cmd + [f"--project={slice_.project}"] * bool(slice_.project)


def commands(slice_: TpuSlice, train_args: Sequence[str], repo_dir: str) -> list[list[str]]:
  """Pack the checkout, copy it to all workers, install it, start the run everywhere."""
  archive = "/tmp/lmjax-src.tgz"
  remote = slice_.remote_dir
  install = (f"mkdir -p {remote} && tar xzf ~/lmjax-src.tgz -C {remote} && cd {remote} && "
             "pip install -q -e '.[tpu,gcs]'")  # gcsfs: pods share no disk, runs live in gs://
  train = f"cd {remote} && python -m launch.train {shlex.join(train_args)}"
  return [
      # The source only: virtual environments (GBs with torch and libtpu) and caches stay.
      ["tar", "czf", archive, "-C", repo_dir, "--exclude=.git", "--exclude=runs",
       "--exclude=.venv*", "--exclude=venv", "--exclude=__pycache__", "--exclude=*.egg-info",
       "."],
      _gcloud(slice_, "scp", archive, f"{slice_.name}:~/lmjax-src.tgz"),
      _gcloud(slice_, "ssh", slice_.name, f"--command={install}"),
      _gcloud(slice_, "ssh", slice_.name, f"--command={train}"),
  ]


def run(cmds: Sequence[Sequence[str]]) -> None:
  for cmd in cmds:
    subprocess.run(list(cmd), check=True)
