"""One trial as a training process: `python -m launch.train` in DIR/<trial>/.

The process dies with the worker that started it (even by kill -9 or the OOM killer),
and the worker holds the trial directory's lock (`lmjax.run_lock`) while it trains: a
worker that finds the directory held by a live process waits for it rather than start a
second trainer there. Its train.log is appended across attempts; sweep_done.json marks a
run that exited 0.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from typing import Any, Mapping, Sequence

from absl import logging

from lmjax import paths, process, run_lock
from lmjax.sweep.report import DONE_FILE, read_trial_metrics

# The checkout (or installation) that holds `launch`: trials run `python -m launch.train`.
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def trial_args(config: str, name: str, overrides: Mapping[str, Any], workdir: str,
               extra: Sequence[str]) -> list[str]:
  """`launch.train` arguments of one trial; `extra` (the user's overrides) come first."""
  return [f"--config={config}", f"--workdir={paths.join(workdir, name)}", *extra,
          *[f"--config.{k}={v}" for k, v in overrides.items()]]


def run_trial(args: Sequence[str], trial_dir: str, heartbeat_s: float = 10.0,
              grace_s: float = 60.0) -> int:
  """Trains one trial under its directory's lock; returns launch.train's exit status.
  A trial another process finished while this one waited is not trained again."""
  lock = _hold_when_free(trial_dir, heartbeat_s, grace_s)
  try:
    if paths.exists(paths.join(trial_dir, DONE_FILE)):
      return 0
    code = _train(args, trial_dir)
    if code == 0:
      done = {**read_trial_metrics(trial_dir), "done": True}  # read before this file exists
      paths.write_atomic(paths.join(trial_dir, DONE_FILE), json.dumps(done))
    return code
  finally:
    lock.release()


def _hold_when_free(trial_dir: str, heartbeat_s: float, grace_s: float) -> run_lock.RunLock:
  waited = False
  while True:
    lock = run_lock.RunLock(trial_dir, heartbeat_s, grace_s)
    try:
      lock.acquire()
      return lock
    except run_lock.RunDirBusy as e:
      if not waited:
        logging.warning("%s; waiting", e)
        waited = True
      time.sleep(heartbeat_s)


def _train(args: Sequence[str], trial_dir: str) -> int:
  """launch.train as a child that dies with this process; its log appended locally (a
  bucket's copy is uploaded after)."""
  log_dir = paths.local_staging(trial_dir)
  paths.makedirs(log_dir)
  log_path = os.path.join(log_dir, "train.log")
  if log_dir != trial_dir and paths.exists(paths.join(trial_dir, "train.log")):
    with open(log_path, "wb") as f:  # an earlier attempt's log, continued
      f.write(paths.read_bytes(paths.join(trial_dir, "train.log")))
  with open(log_path, "a") as log:
    # This thread waits for the child: Linux's parent-death signal follows the thread.
    code = subprocess.run([sys.executable, "-m", "launch.train", *args], cwd=ROOT, stdout=log,
                          stderr=subprocess.STDOUT,
                          preexec_fn=process.child_dies_with_parent()).returncode
  if log_dir != trial_dir:
    paths.put_file(log_path, paths.join(trial_dir, "train.log"))
    paths.remove_local_staging(log_dir, trial_dir)
  return code
