"""Processes and their lifetimes: whether a pid is alive, and children that die with their
parent (data-preparation pool workers, a sweep's training runs), even when the parent is
killed with SIGKILL or by the OOM killer."""

from __future__ import annotations

import ctypes
import functools
import os
import signal
from typing import Callable

_PR_SET_PDEATHSIG = 1


def alive(pid: int) -> bool:
  """Whether `pid` runs on this host; a zombie (killed, not yet reaped by an init that may
  never reap it) is dead."""
  try:
    with open(f"/proc/{pid}/stat") as f:
      return f.read().rpartition(")")[2].split()[0] not in ("Z", "X")
  except (OSError, IndexError):
    pass
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True
  return True


@functools.cache
def _prctl() -> Callable[..., int] | None:
  try:
    return ctypes.CDLL("libc.so.6", use_errno=True).prctl
  except (OSError, AttributeError):  # not Linux: children outlive their parent there
    return None


def die_with_parent(parent_pid: int | None = None) -> None:
  """Linux sends this process SIGKILL when its parent dies (PR_SET_PDEATHSIG). With
  `parent_pid`, the process that started it: if that one died before this call, exit now."""
  prctl = _prctl()
  if prctl is None:
    return
  prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
  if parent_pid is not None and os.getppid() != parent_pid:
    os._exit(1)


def child_dies_with_parent() -> Callable[[], None]:
  """A `subprocess` preexec_fn: the child dies with this process. libc is loaded here, in
  the parent, so the forked child only calls prctl before its exec. Linux ties the signal
  to the thread that started the child: start it from a thread that waits for it."""
  _prctl()
  parent = os.getpid()
  return lambda: die_with_parent(parent)
