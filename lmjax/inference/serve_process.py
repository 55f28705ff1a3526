"""`launch.serve` in a subprocess, for tests and benchmarks (`benchmarks.serve`)."""

from __future__ import annotations

import os
import queue
import subprocess
import sys
import threading
from typing import Any


def spawn(workdir: str, *args: str, timeout: float = 300.0, env: dict | None = None,
          log: Any = None) -> tuple[subprocess.Popen, str]:
  """Starts `python -m launch.serve --workdir WORKDIR --port 0 ARGS` in a session of its own;
  returns (the process, its base URL http://HOST:PORT) once it listens. stderr goes to `log`
  (a file), stdout is read for the address."""
  root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  proc = subprocess.Popen([sys.executable, "-m", "launch.serve", f"--workdir={workdir}",
                           "--port=0", *args], cwd=root, env=env, stdout=subprocess.PIPE,
                          stderr=log or subprocess.DEVNULL, text=True, start_new_session=True)
  lines: queue.Queue = queue.Queue()

  def read():
    for x in proc.stdout:
      lines.put(x)
    lines.put(None)  # it exited
  threading.Thread(target=read, daemon=True).start()
  try:
    line = lines.get(timeout=timeout)
  except queue.Empty:
    proc.kill()
    raise TimeoutError(f"launch.serve did not start within {timeout}s") from None
  if line is None or not line.startswith("serving "):
    proc.kill()
    raise RuntimeError(f"launch.serve exited ({proc.wait(30)}) before it listened")
  return proc, line.split(" on ")[-1].strip().removesuffix("/v1")
