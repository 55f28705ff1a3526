"""N local processes joined through a coordinator on 127.0.0.1; one failure stops all.

Each child gets LMJAX_COORDINATOR_ADDRESS / LMJAX_NUM_PROCESSES / LMJAX_PROCESS_ID
(read by `lmjax.distributed`) and, for CPU runs, LMJAX_CPU_DEVICES simulated devices.
Output lines are prefixed with the process index.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from typing import Sequence

GRACE_S = 20  # after a failure, survivors get this long to exit before SIGKILL


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def child_env(process_id: int, num_processes: int, port: int, devices_per_process: int
              ) -> dict[str, str]:
  env = dict(os.environ, LMJAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
             LMJAX_NUM_PROCESSES=str(num_processes), LMJAX_PROCESS_ID=str(process_id),
             PYTHONUNBUFFERED="1")
  if devices_per_process:
    env["LMJAX_CPU_DEVICES"] = str(devices_per_process)
  return env


def _pump(index: int, stream, out) -> None:
  for line in iter(stream.readline, ""):
    out.write(f"[{index}] {line}")
    out.flush()


def run_local(command: Sequence[str], num_processes: int, devices_per_process: int = 0,
              poll_s: float = 0.2) -> int:
  """Runs `command` in `num_processes` processes; returns 0 or the first failure's code."""
  port = free_port()
  procs = [subprocess.Popen(list(command), env=child_env(i, num_processes, port,
                                                         devices_per_process),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
           for i in range(num_processes)]
  pumps = [threading.Thread(target=_pump, args=(i, p.stdout, sys.stderr), daemon=True)
           for i, p in enumerate(procs)]
  for t in pumps:
    t.start()
  try:
    failure = _wait(procs, poll_s)
  except KeyboardInterrupt:
    failure = 130
  if failure:
    _stop(procs)
  for t in pumps:
    t.join(timeout=5)
  return failure


def _wait(procs: list[subprocess.Popen], poll_s: float) -> int:
  while True:
    codes = [p.poll() for p in procs]
    failed = [c for c in codes if c not in (None, 0)]
    if failed:
      return failed[0]
    if all(c == 0 for c in codes):
      return 0
    time.sleep(poll_s)


def _stop(procs: list[subprocess.Popen]) -> None:
  """SIGTERM (a chance to save), then SIGKILL after GRACE_S."""
  for p in procs:
    if p.poll() is None:
      os.killpg(p.pid, signal.SIGTERM)
  deadline = time.monotonic() + GRACE_S
  for p in procs:
    try:
      p.wait(timeout=max(deadline - time.monotonic(), 0.1))
    except subprocess.TimeoutExpired:
      os.killpg(p.pid, signal.SIGKILL)
      p.wait()
