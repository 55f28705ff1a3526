"""Hyperparameter sweeps: a grid and/or seeded random search over config overrides.

A sweep file is Python with `get_sweep()` returning a `Sweep`. Each trial is an
ordinary `launch.train` run in DIR/<trial-name>/, so an unfinished trial resumes
like any run; `summarize` ranks the trials by their best eval loss.
"""

from __future__ import annotations

import csv
import dataclasses
import importlib.util
import io
import itertools
import json
import math
import os
import re
import statistics
from typing import Any, Mapping, Sequence

import numpy as np

from lmjax import paths
from lmjax.errors import UserError


@dataclasses.dataclass(frozen=True)
class LogUniform:
  low: float
  high: float

  def sample(self, rng: np.random.Generator) -> float:
    return float(math.exp(rng.uniform(math.log(self.low), math.log(self.high))))


@dataclasses.dataclass(frozen=True)
class Uniform:
  low: float
  high: float

  def sample(self, rng: np.random.Generator) -> float:
    return float(rng.uniform(self.low, self.high))


@dataclasses.dataclass(frozen=True)
class Choice:
  values: tuple

  def sample(self, rng: np.random.Generator) -> Any:
    return self.values[int(rng.integers(len(self.values)))]


@dataclasses.dataclass(frozen=True)
class Trial:
  name: str
  overrides: dict[str, Any]  # dotted config key -> value


@dataclasses.dataclass(frozen=True)
class Sweep:
  grid: Mapping[str, Sequence[Any]] = dataclasses.field(default_factory=dict)  # all combinations
  random: Mapping[str, LogUniform | Uniform | Choice] = dataclasses.field(default_factory=dict)
  num_samples: int = 1  # random draws per grid point (when `random` is set)
  seed: int = 0  # random search is reproducible
  fixed: Mapping[str, Any] = dataclasses.field(default_factory=dict)  # applied to every trial

  def trials(self) -> list[Trial]:
    rng = np.random.default_rng(self.seed)
    keys = list(self.grid)
    out = []
    for point in itertools.product(*(self.grid[k] for k in keys)):
      for _ in range(self.num_samples if self.random else 1):
        sampled = {k: dist.sample(rng) for k, dist in self.random.items()}
        varied = {**dict(zip(keys, point)), **sampled}
        out.append(Trial(_trial_name(len(out), varied), {**self.fixed, **varied}))
    return out


def _format(value: Any) -> str:
  return f"{value:.3g}" if isinstance(value, float) else str(value)


def _trial_name(index: int, varied: Mapping[str, Any]) -> str:
  parts = [f"{k.split('.')[-1]}={_format(v)}" for k, v in varied.items()]
  return re.sub(r"[^A-Za-z0-9_.=+-]", "_", "_".join([f"{index:03d}", *parts]))[:120]


def load_sweep(path: str) -> Any:
  """The sweep file's `get_sweep()`: a grid `Sweep` or an Optuna `lmjax.search.Search`."""
  if not os.path.isfile(path):
    raise UserError(f"sweep file not found: {path}")
  spec = importlib.util.spec_from_file_location("lmjax_sweep_file", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  if not hasattr(module, "get_sweep"):
    raise UserError(f"{path} must define get_sweep() returning lmjax.sweep.Sweep or "
                    "lmjax.search.Search")
  return module.get_sweep()


def trial_args(config: str, trial: Trial, workdir: str, extra: Sequence[str]) -> list[str]:
  """`launch.train` arguments of one trial; `extra` (user overrides) come first."""
  overrides = [f"--config.{k}={v}" for k, v in trial.overrides.items()]
  return [f"--config={config}", f"--workdir={paths.join(workdir, trial.name)}", *extra,
          *overrides]


def read_trial(trial_dir: str) -> dict[str, Any]:
  """Eval curve, final and best eval loss and median tokens/s from a trial's metrics.jsonl."""
  path = paths.join(trial_dir, "metrics.jsonl")
  text = paths.read_bytes(path).decode() if paths.exists(path) else ""
  records = [json.loads(line) for line in text.splitlines() if line.strip()]
  evals = [(r["step"], r["loss"]) for r in records if r["split"] == "eval"]
  speeds = [r["tokens_per_s"] for r in records if r["split"] == "train" and "tokens_per_s" in r]
  return {"curve": evals, "final_eval_loss": evals[-1][1] if evals else float("nan"),
          "best_eval_loss": min(l for _, l in evals) if evals else float("nan"),
          "tokens_per_s": statistics.median(speeds) if speeds else float("nan"),
          "done": paths.exists(paths.join(trial_dir, "sweep_done.json"))}


def summarize(workdir: str, trials: Sequence[Trial], status: Mapping[str, str] | None = None
              ) -> list[dict[str, Any]]:
  """Writes summary.csv, summary.md and loss_curves.png in `workdir`, best trial first.
  `status` (a search's trial states: complete, pruned, running, fail) by trial name;
  a grid trial is complete or unfinished."""
  rows = []
  for trial in trials:
    info = read_trial(paths.join(workdir, trial.name))
    state = (status or {}).get(trial.name) or ("complete" if info["done"] else "unfinished")
    rows.append({"trial": trial.name, "overrides": json.dumps(trial.overrides), **info,
                 "status": state})
  rows.sort(key=lambda r: (math.isnan(r["best_eval_loss"]), r["best_eval_loss"]))
  columns = ["trial", "overrides", "final_eval_loss", "best_eval_loss", "tokens_per_s", "done",
             "status"]
  table = io.StringIO(newline="")
  writer = csv.DictWriter(table, columns, extrasaction="ignore")
  writer.writeheader()
  writer.writerows(rows)
  paths.write_atomic(paths.join(workdir, "summary.csv"), table.getvalue())
  lines = ["| rank | trial | overrides | final eval loss | best eval loss | tokens/s | done "
           "| status |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
  for rank, r in enumerate(rows, 1):
    lines.append(f"| {rank} | {r['trial']} | `{r['overrides']}` | {r['final_eval_loss']:.4f} | "
                 f"{r['best_eval_loss']:.4f} | {r['tokens_per_s']:,.0f} | {r['done']} | "
                 f"{r['status']} |")
  paths.write_atomic(paths.join(workdir, "summary.md"), "\n".join(lines) + "\n")
  _plot(rows, paths.join(workdir, "loss_curves.png"))
  return rows


def _plot(rows: Sequence[Mapping[str, Any]], path: str) -> None:
  import matplotlib
  matplotlib.use("Agg")  # files only, no display
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(8, 5))
  for r in rows:
    if r["curve"]:
      steps, losses = zip(*r["curve"])
      ax.plot(steps, losses, marker="o", label=r["trial"])
  ax.set_xlabel("step")
  ax.set_ylabel("eval loss")
  ax.set_title("eval loss by trial")
  ax.legend(fontsize=7)
  fig.tight_layout()
  image = io.BytesIO()
  fig.savefig(image, format="png", dpi=100)
  paths.write_atomic(path, image.getvalue())
  plt.close(fig)
