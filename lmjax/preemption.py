"""Stopping cleanly on SIGTERM/SIGINT: the loop saves the current step and exits 0.

One process: a signal handler sets a flag the loop polls after each step.
Several processes: JAX's preemption sync point (fed by the coordination
service's own SIGTERM notifier) makes all processes stop at the same step.
"""

from __future__ import annotations

import signal
import threading

import jax
from absl import logging
from jax.experimental import multihost_utils


class PreemptionWatch:
  """Context manager; `requested(step)` is True once the run should save and stop."""

  def __init__(self):
    self._flag = threading.Event()
    self._previous: dict[int, object] = {}

  def __enter__(self) -> "PreemptionWatch":
    if threading.current_thread() is not threading.main_thread():
      return self  # signal handlers can only be installed from the main thread
    # Under jax.distributed, SIGTERM belongs to JAX's notifier; Ctrl-C stays ours.
    signals = [signal.SIGINT] + ([signal.SIGTERM] if jax.process_count() == 1 else [])
    for sig in signals:
      self._previous[sig] = signal.signal(sig, self._handle)
    return self

  def __exit__(self, *exc) -> None:
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)

  def _handle(self, signum, frame) -> None:
    del frame
    if self._flag.is_set():  # a second signal: stop now
      raise KeyboardInterrupt
    logging.warning("received %s: saving a checkpoint, then exiting",
                    signal.Signals(signum).name)
    self._flag.set()

  def requested(self, step: int) -> bool:
    if self._flag.is_set():
      return True
    if jax.process_count() > 1:
      return multihost_utils.reached_preemption_sync_point(step)
    return False
