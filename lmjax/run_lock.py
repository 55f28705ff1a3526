"""One trainer per run directory: DIR/run.lock names the process that holds it.

The lock records the holder's host, pid and a heartbeat its thread refreshes every
`heartbeat_s`. Another process that finds the lock held by a live process fails with one
line (`RunDirBusy`); a stale lock (its holder is dead on this host, or has not beaten for
`grace_s` anywhere) is taken over, so a killed run resumes as before. A lock held by this
process's parent on this host (a sweep worker that started this training run) counts as
this process's own.

On a local or shared (NFS) file system the lock is taken with a hard link, which exactly
one process wins; in a bucket (gs://, s3://) it is advisory: written, then read back.

    with RunLock(workdir, heartbeat_s=10, grace_s=60):
      train(...)
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid
from typing import Any

from absl import logging

from lmjax import paths, process
from lmjax.errors import UserError

LOCK_FILE = "run.lock"
HOST = socket.gethostname()


class RunDirBusy(UserError):
  """The run directory is held by another live process."""


def holder(run_dir: str, grace_s: float) -> dict[str, Any] | None:
  """The record of the live process holding `run_dir`, or None (free, or a stale lock)."""
  record = _read(paths.join(run_dir, LOCK_FILE))
  return record if record is not None and _live(record, grace_s) else None


def describe(record: dict[str, Any]) -> str:
  return (f"{record.get('host')} pid {record.get('pid')}, its heartbeat "
          f"{time.time() - float(record.get('beat', 0)):.0f}s ago")


class RunLock:
  """Holds `run_dir`'s lock while its block runs (a context manager)."""

  def __init__(self, run_dir: str, heartbeat_s: float = 10.0, grace_s: float = 60.0):
    self.run_dir, self.path = run_dir, paths.join(run_dir, LOCK_FILE)
    self.heartbeat_s, self.grace_s = heartbeat_s, grace_s
    self.record = {"host": HOST, "pid": os.getpid(), "token": uuid.uuid4().hex}
    self._stop = threading.Event()
    self._thread: threading.Thread | None = None
    self.inherited = False  # held by the parent process: nothing to beat or release

  def __enter__(self) -> "RunLock":
    self.acquire()
    return self

  def __exit__(self, *exc: Any) -> None:
    self.release()

  def acquire(self) -> None:
    """Takes the lock, or raises RunDirBusy naming its live holder."""
    paths.makedirs(self.run_dir)
    for _ in range(5):
      raw = _read_raw(self.path)
      current = _parse(raw)
      if current is not None and _live(current, self.grace_s):
        if current.get("host") == HOST and current.get("pid") == os.getppid():
          self.inherited = True
          return
        raise RunDirBusy(f"{self.run_dir} is held by another run: {describe(current)} "
                         f"(its lock {self.path} is taken over {self.grace_s:.0f}s after "
                         "its holder stops)")
      if self._claim(raw):  # a stale, or unreadable, lock is replaced
        self._thread = threading.Thread(target=self._beat, name="lmjax-run-lock", daemon=True)
        self._thread.start()
        return
    raise RunDirBusy(f"{self.run_dir}: other processes keep taking its lock {self.path}")

  def release(self) -> None:
    if self.inherited or self._thread is None:
      return
    self._stop.set()
    self._thread.join(30)
    self._thread = None
    current = _read(self.path)
    if current is not None and current.get("token") == self.record["token"]:
      paths.remove(self.path)

  def _claim(self, stale: bytes | None) -> bool:
    """Writes this process's lock where `stale` (or nothing) was; False if another won."""
    if paths.is_remote(self.path):  # no atomic create in a bucket: last writer wins
      paths.write_atomic(self.path, self._content())
      time.sleep(min(1.0, self.heartbeat_s))
      mine = _read(self.path)
      return mine is not None and mine.get("token") == self.record["token"]
    if stale is not None and not _move_aside(self.path, stale):
      return False
    tmp = paths.join(self.run_dir, f".{LOCK_FILE}.{paths.tmp_tag()}")
    with open(tmp, "w") as f:
      f.write(self._content())
    try:
      os.link(tmp, self.path)  # fails if the file exists: exactly one process creates it
      return True
    except FileExistsError:
      return False
    finally:
      os.remove(tmp)

  def _content(self) -> str:
    return json.dumps({**self.record, "beat": time.time()})

  def _beat(self) -> None:
    while not self._stop.wait(self.heartbeat_s):
      current = _read(self.path)
      if current is not None and current.get("token") != self.record["token"]:
        logging.warning("lost the lock of %s to %s", self.run_dir, describe(current))
        return
      try:
        paths.write_atomic(self.path, self._content())
      except OSError as e:  # a file system hiccup: the next beat retries
        logging.warning("could not refresh %s: %s", self.path, e)


def _read_raw(path: str) -> bytes | None:
  try:
    return paths.read_bytes(path)
  except OSError:
    return None


def _parse(raw: bytes | None) -> dict[str, Any] | None:
  try:
    record = json.loads(raw) if raw is not None else None
  except ValueError:  # not a lock lmjax wrote: nobody holds it
    return None
  return record if isinstance(record, dict) else None


def _read(path: str) -> dict[str, Any] | None:
  return _parse(_read_raw(path))


def _live(record: dict[str, Any], grace_s: float) -> bool:
  fresh = time.time() - float(record.get("beat", 0)) <= grace_s
  if record.get("host") == HOST:
    return fresh and isinstance(record.get("pid"), int) and process.alive(record["pid"])
  return fresh


def _move_aside(path: str, stale: bytes) -> bool:
  """Removes a stale lock unless another process replaced it since it was read."""
  folder, name = os.path.split(path)
  aside = os.path.join(folder, f".{name}.stale-{paths.tmp_tag()}")
  try:
    os.rename(path, aside)  # one process moves a given file
  except FileNotFoundError:
    return True  # another taker moved it: race for the creation
  if _read_raw(aside) == stale:
    os.remove(aside)
    return True
  try:  # it was a fresh lock: put it back
    os.link(aside, path)
  except FileExistsError:
    pass
  os.remove(aside)
  return False
