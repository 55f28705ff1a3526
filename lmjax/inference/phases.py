"""Where a serving thread's time goes: wall seconds per named phase and event counts, cheap
enough to stay on (two `perf_counter` calls a phase). `GET /health` reports them and
`python -m benchmarks.serve --profile` turns them into a per-phase table."""

from __future__ import annotations

import time
from typing import Sequence


class Phases:
  """Accumulated seconds per phase and counts, written by one thread, read by any."""

  def __init__(self, phases: Sequence[str], counts: Sequence[str]):
    self.seconds = dict.fromkeys(phases, 0.0)
    self.counts = dict.fromkeys(counts, 0)
    self.thread_cpu = 0.0  # CPU seconds of the writing thread, as of its last `mark_cpu`

  def since(self, phase: str, start: float) -> float:
    """Adds the time since `start` (a `time.perf_counter()`) to `phase`; returns now."""
    now = time.perf_counter()
    self.seconds[phase] += now - start
    return now

  def count(self, name: str, n: int = 1) -> None:
    self.counts[name] += n

  def mark_cpu(self) -> None:
    """Records the calling thread's CPU time (call it from the thread being measured)."""
    self.thread_cpu = time.thread_time()

  def snapshot(self) -> dict:
    """A copy (the keys never change after construction, so copying under the writer is
    safe)."""
    return {"seconds": dict(self.seconds), "counts": dict(self.counts),
            "thread_cpu_s": self.thread_cpu}
