"""Two processes over gloo on 127.0.0.1: preemption of one, and the death of one.

The processes are started directly (not through launch.local, which would stop
the others itself) so that what is tested is the runtime's own behaviour.
"""

import signal
import socket
import subprocess
import sys
import time

from tiny import ROOT, TINY_OVERRIDES

TIMEOUT = 300
HEARTBEAT_S = 10


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _flags(tmp_path, workdir, **extra):
  values = dict(TINY_OVERRIDES, **{"data.cache_dir": str(tmp_path / "cache"),
                                   "train.log_every": 2}, **extra)
  return ["--config=experiments/clm_tiny.py", f"--workdir={workdir}",
          *[f"--config.{k}={v}" for k, v in values.items()]]


def _start(tmp_path, workdir, **extra):
  port = _free_port()
  procs = []
  for i in range(2):
    cmd = [sys.executable, "-m", "launch.train", *_flags(tmp_path, workdir, **extra),
           f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2", f"--process_id={i}",
           f"--heartbeat_timeout={HEARTBEAT_S}"]
    procs.append(subprocess.Popen(cmd, cwd=ROOT, stderr=subprocess.PIPE, text=True))
  return procs


def _wait_for_training(procs, workdir, lines=2):
  metrics = workdir / "metrics.jsonl"
  deadline = time.monotonic() + TIMEOUT
  while not (metrics.exists() and metrics.read_text().count("\n") >= lines):
    assert all(p.poll() is None for p in procs), [p.communicate()[1][-2000:] for p in procs]
    assert time.monotonic() < deadline, "training did not start"
    time.sleep(0.2)


def _kill_all(procs):
  for p in procs:
    if p.poll() is None:
      p.kill()
      p.wait(timeout=30)


def _steps(workdir):
  return sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())


def _finish(tmp_path, workdir, steps):
  """Relaunches both processes to `steps`; returns process 0's log."""
  procs = _start(tmp_path, workdir, **{"train.steps": steps})
  try:
    errs = [p.communicate(timeout=TIMEOUT)[1] for p in procs]
  finally:
    _kill_all(procs)
  assert [p.returncode for p in procs] == [0, 0], [e[-2000:] for e in errs]
  return errs[0]


def test_preemption_and_death_of_one_process(tmp_path):
  """SIGTERM to one process: both save the same step and exit 0 within 30 s. Then
  kill -9 of one: the survivor exits non-zero within the heartbeat bound. Each time
  the relaunch resumes from the newest checkpoint."""
  workdir = tmp_path / "run"
  procs = _start(tmp_path, workdir, **{"train.steps": 100000, "train.checkpoint_every": 100000})
  try:
    _wait_for_training(procs, workdir)
    sent = time.monotonic()
    procs[1].send_signal(signal.SIGTERM)  # as a preemption notice reaches one host first
    errs = [p.communicate(timeout=60)[1] for p in procs]
    latency = time.monotonic() - sent
  finally:
    _kill_all(procs)
  assert [p.returncode for p in procs] == [0, 0], [e[-2000:] for e in errs]
  assert latency < 30
  assert all("preempted: checkpoint of step" in e for e in errs), errs[0][-2000:]
  stopped = [int(e.split("preempted: checkpoint of step ")[1].split()[0]) for e in errs]
  assert stopped[0] == stopped[1] and _steps(workdir) == [stopped[0]]
  print(f"SIGTERM to exit of both processes: {latency:.1f}s, saved step {stopped[0]}")

  procs = _start(tmp_path, workdir, **{"train.steps": 100000, "train.checkpoint_every": 4})
  try:
    _wait_for_training(procs, workdir, lines=_lines(workdir) + 2)
    procs[1].kill()
    killed = time.monotonic()
    _, err = procs[0].communicate(timeout=HEARTBEAT_S * 6)
    waited = time.monotonic() - killed
  finally:
    _kill_all(procs)
  assert f"resumed from {workdir / 'checkpoints'} step {stopped[0]}" in err
  assert procs[0].returncode != 0, err[-2000:]
  print(f"survivor exited {waited:.1f}s after its peer was killed (heartbeat {HEARTBEAT_S}s)")
  saved = _steps(workdir)[-1]
  log = _finish(tmp_path, workdir, saved + 2)
  assert f"resumed from {workdir / 'checkpoints'} step {saved}" in log
  assert _steps(workdir)[-1] == saved + 2


def _lines(workdir):
  return (workdir / "metrics.jsonl").read_text().count("\n")
