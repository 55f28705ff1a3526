"""Shared by benchmarks.optimizers and benchmarks.wsd: runs through `launch.sweep` and
`launch.train`'s command lines, and the held-out loss curves they leave in metrics.jsonl."""

from __future__ import annotations

import csv
import json
import os
import statistics
import subprocess
import sys
from typing import Any, Sequence

from lmjax.errors import UserError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = "experiments/clm_tiny.py"


def overrides(changes: dict[str, Any]) -> list[str]:
  return [f"--config.{k}={v}" for k, v in changes.items()]


def grid_file(path: str, grid: dict[str, Sequence[Any]], fixed: dict[str, Any] | None = None
              ) -> str:
  """A sweep file of a grid (every combination), written for `launch.sweep --sweep`."""
  with open(path, "w") as f:
    f.write("from lmjax.sweep import Sweep\n\n\ndef get_sweep():\n"
            f"  return Sweep(grid={grid!r}, fixed={fixed or {}!r})\n")
  return path


def run_sweep(sweep: str, workdir: str, extra: list[str], parallel: int = 1) -> None:
  """`python -m launch.sweep` over clm_tiny; a bad input is its one line."""
  proc = subprocess.run([sys.executable, "-m", "launch.sweep", f"--config={CONFIG}",
                         f"--sweep={sweep}", f"--workdir={workdir}", f"--parallel={parallel}",
                         "--", *extra], cwd=ROOT, capture_output=True, text=True,
                        timeout=6 * 3600)
  if proc.returncode == 2:
    raise UserError(proc.stderr.strip().splitlines()[-1].removeprefix("error: "))
  if proc.returncode != 0:
    raise RuntimeError(f"launch.sweep failed: {proc.stderr[-3000:]}")


def run_train(workdir: str, extra: list[str]) -> None:
  """One `python -m launch.train` run of clm_tiny."""
  proc = subprocess.run([sys.executable, "-m", "launch.train", f"--config={CONFIG}",
                         f"--workdir={workdir}", *extra], cwd=ROOT, capture_output=True,
                        text=True, timeout=6 * 3600)
  if proc.returncode != 0:
    raise RuntimeError(f"launch.train failed ({proc.returncode}): {proc.stderr[-3000:]}")


def trials(workdir: str) -> list[dict[str, Any]]:
  """A sweep's trials: {dir, overrides, curve}, from summary.csv and each metrics.jsonl."""
  out = []
  with open(os.path.join(workdir, "summary.csv")) as f:
    for row in csv.DictReader(f):
      folder = os.path.join(workdir, row["trial"])
      out.append({"dir": folder, "overrides": json.loads(row["overrides"]),
                  "curve": curve(folder)})
  return out


def curve(workdir: str, split: str = "eval") -> list[tuple[int, float]]:
  """[(step, held-out loss)] of a run, in step order."""
  records = [json.loads(x) for x in open(os.path.join(workdir, "metrics.jsonl")) if x.strip()]
  return sorted({r["step"]: r["loss"] for r in records if r["split"] == split}.items())


def median_curve(curves: list[list[tuple[int, float]]]) -> list[tuple[int, float]]:
  """The median over runs at each step they all evaluated."""
  steps = sorted(set.intersection(*(set(s for s, _ in c) for c in curves)))
  return [(s, statistics.median(dict(c)[s] for c in curves)) for s in steps]


def steps_to_reach(points: list[tuple[int, float]], target: float) -> float | None:
  """The first step at which a curve reaches `target`, interpolated linearly between its
  evaluations; None if it never does."""
  previous = (0, float("inf"))
  for step, loss in points:
    if loss <= target:
      (s0, l0) = previous
      if l0 == float("inf"):
        return float(step)
      return s0 + (step - s0) * (l0 - target) / (l0 - loss)
    previous = (step, loss)
  return None
