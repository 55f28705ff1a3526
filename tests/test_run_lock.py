"""One trainer per run directory (lmjax.run_lock) and children that die with their parent
(lmjax.process): a live holder keeps the directory, a dead or silent one loses it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from lmjax import process, run_lock
from lmjax.run_lock import LOCK_FILE, RunDirBusy, RunLock
from tiny import ROOT

_HOLD = """
import sys, time
from lmjax.run_lock import RunLock
lock = RunLock(sys.argv[1], heartbeat_s=0.2, grace_s=5)
lock.acquire()
print("held", flush=True)
if len(sys.argv) > 2:  # a child that takes the same directory: its parent's lock is its own
  import subprocess
  code = subprocess.run([sys.executable, "-c", "import sys; from lmjax.run_lock import RunLock;"
                         "l = RunLock(sys.argv[1]); l.acquire(); print(l.inherited)", sys.argv[1]],
                        capture_output=True, text=True)
  print(code.stdout.strip(), flush=True)
time.sleep(600)
"""


def _holder(run_dir, *extra) -> subprocess.Popen:
  proc = subprocess.Popen([sys.executable, "-c", _HOLD, str(run_dir), *extra], cwd=ROOT,
                          stdout=subprocess.PIPE, text=True)
  assert proc.stdout.readline().strip() == "held"
  return proc


def _record(run_dir) -> dict:
  return json.loads((run_dir / LOCK_FILE).read_text())


def test_a_live_holder_keeps_its_directory_until_it_dies(tmp_path):
  holder = _holder(tmp_path)
  try:
    first = _record(tmp_path)
    assert first["pid"] == holder.pid and first["host"] == run_lock.HOST
    time.sleep(0.6)
    assert _record(tmp_path)["beat"] > first["beat"]  # its heartbeat
    with pytest.raises(RunDirBusy) as e:
      RunLock(str(tmp_path), grace_s=5).acquire()
    assert "\n" not in str(e.value) and f"pid {holder.pid}" in str(e.value)
    assert run_lock.holder(str(tmp_path), 5)["pid"] == holder.pid
  finally:
    holder.kill()
    holder.wait(30)
  # Dead on this host: taken over at once, whatever its last heartbeat.
  assert run_lock.holder(str(tmp_path), 5) is None
  with RunLock(str(tmp_path), grace_s=5) as lock:
    assert _record(tmp_path)["token"] == lock.record["token"]
  assert not (tmp_path / LOCK_FILE).exists()  # released


def test_a_lock_from_another_host_counts_until_its_heartbeat_is_older_than_the_grace(tmp_path):
  record = {"host": "elsewhere", "pid": 1, "token": "t", "beat": time.time()}
  (tmp_path / LOCK_FILE).write_text(json.dumps(record))
  with pytest.raises(RunDirBusy, match="held by another run: elsewhere pid 1"):
    RunLock(str(tmp_path), grace_s=30).acquire()
  (tmp_path / LOCK_FILE).write_text(json.dumps({**record, "beat": time.time() - 31}))
  lock = RunLock(str(tmp_path), grace_s=30)
  lock.acquire()
  assert _record(tmp_path)["host"] == run_lock.HOST
  lock.release()


def test_a_lock_held_by_the_parent_process_is_the_childs_own(tmp_path):
  holder = _holder(tmp_path, "child")
  try:
    assert holder.stdout.readline().strip() == "True"  # the child was let in
    assert _record(tmp_path)["pid"] == holder.pid  # and left the parent's lock alone
  finally:
    holder.kill()
    holder.wait(30)


def test_a_child_dies_with_its_parent_even_by_kill_9(tmp_path):
  """What a sweep worker does for its trial's training process (and prepare_data for its
  pool): the child gets SIGKILL from the kernel when the parent is killed."""
  code = ("import subprocess, sys, time; from lmjax import process\n"
          "c = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)'],"
          " preexec_fn=process.child_dies_with_parent())\n"
          "print(c.pid, flush=True); c.wait()")
  parent = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stdout=subprocess.PIPE,
                            text=True)
  child = int(parent.stdout.readline())
  assert process.alive(child)
  os.kill(parent.pid, signal.SIGKILL)
  parent.wait(30)
  deadline = time.monotonic() + 30
  while process.alive(child) and time.monotonic() < deadline:
    time.sleep(0.1)
  assert not process.alive(child)


def test_a_lock_file_lmjax_did_not_write_holds_nothing(tmp_path):
  (tmp_path / LOCK_FILE).write_text("")  # an empty or foreign file
  assert run_lock.holder(str(tmp_path), 5) is None
  with RunLock(str(tmp_path), grace_s=5) as lock:
    assert _record(tmp_path)["token"] == lock.record["token"]


_RACE = """
import sys, time
from lmjax.run_lock import RunDirBusy, RunLock
while time.time() < float(sys.argv[2]):  # start together
  time.sleep(0.001)
try:
  RunLock(sys.argv[1], heartbeat_s=0.2, grace_s=5).acquire()
  print("won", flush=True)
  time.sleep(float(sys.argv[2]) + 15 - time.time())  # until every racer has tried
except RunDirBusy:
  print("busy", flush=True)
"""


def test_processes_racing_for_a_stale_lock_leave_one_holder(tmp_path):
  dead = subprocess.Popen([sys.executable, "-c", "pass"])
  dead.wait(30)  # its pid is free: the lock below is a dead holder's on this host
  (tmp_path / LOCK_FILE).write_text(json.dumps(
      {"host": run_lock.HOST, "pid": dead.pid, "token": "old", "beat": time.time()}))
  start = time.time() + 5
  racers = [subprocess.Popen([sys.executable, "-c", _RACE, str(tmp_path), str(start)], cwd=ROOT,
                             stdout=subprocess.PIPE, text=True) for _ in range(4)]
  outs = sorted(r.communicate(timeout=60)[0].strip() for r in racers)
  assert outs == ["busy", "busy", "busy", "won"]
