"""What a sweep leaves beside its trials: each trial's metrics read back, summary.csv and
summary.md ranking the trials by best eval loss, loss_curves.png, and for a search
Optuna's optimisation history and parameter importances."""

from __future__ import annotations

import csv
import io
import json
import math
import statistics
from typing import Any, Mapping, Sequence

from lmjax import paths
from lmjax.sweep.grid import Trial

DONE_FILE = "sweep_done.json"  # written when a trial's run exits 0 (complete or pruned)
COLUMNS = ["trial", "overrides", "final_eval_loss", "best_eval_loss", "tokens_per_s", "done",
           "status"]


def read_trial_metrics(trial_dir: str, metric: str = "loss") -> dict[str, Any]:
  """A trial's metrics.jsonl: the eval curve of `metric` [(step, value)], its final and
  best (lowest) value, the median training tokens/s and whether the trial is done."""
  path = paths.join(trial_dir, "metrics.jsonl")
  text = paths.read_bytes(path).decode() if paths.exists(path) else ""
  records = [json.loads(line) for line in text.splitlines() if line.strip()]
  curve = [(r["step"], r[metric]) for r in records if r.get("split") == "eval" and metric in r]
  speeds = [r["tokens_per_s"] for r in records if r.get("split") == "train"
            and "tokens_per_s" in r]
  return {"curve": curve, "final": curve[-1][1] if curve else math.nan,
          "best": min(v for _, v in curve) if curve else math.nan,
          "tokens_per_s": statistics.median(speeds) if speeds else math.nan,
          "done": paths.exists(paths.join(trial_dir, DONE_FILE))}


def write_summary(workdir: str, trials: Sequence[Trial],
                  status: Mapping[str, str] | None = None) -> list[dict[str, Any]]:
  """Writes summary.csv, summary.md and loss_curves.png in `workdir`; returns the rows,
  best trial first. `status`: a search's trial states (complete, pruned, running, fail)
  by trial name; a grid trial is complete or unfinished."""
  rows = []
  for trial in trials:
    info = read_trial_metrics(paths.join(workdir, trial.name))
    state = (status or {}).get(trial.name) or ("complete" if info["done"] else "unfinished")
    rows.append({"trial": trial.name, "overrides": json.dumps(trial.overrides),
                 "curve": info["curve"], "final_eval_loss": info["final"],
                 "best_eval_loss": info["best"], "tokens_per_s": info["tokens_per_s"],
                 "done": info["done"], "status": state})
  rows.sort(key=lambda r: (math.isnan(r["best_eval_loss"]), r["best_eval_loss"]))
  table = io.StringIO(newline="")
  writer = csv.DictWriter(table, COLUMNS, extrasaction="ignore")
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
  write_loss_curves(rows, paths.join(workdir, "loss_curves.png"))
  return rows


def write_loss_curves(rows: Sequence[Mapping[str, Any]], path: str) -> None:
  plt = _pyplot()
  fig, ax = plt.subplots(figsize=(8, 5))
  for r in rows:
    if r["curve"]:
      steps, losses = zip(*r["curve"])
      ax.plot(steps, losses, marker="o", label=r["trial"])
  ax.set_xlabel("step")
  ax.set_ylabel("eval loss")
  ax.set_title("eval loss by trial")
  ax.legend(fontsize=7)
  _save_png(fig, path)


def write_study_summary(study: Any, workdir: str) -> list[dict[str, Any]]:
  """The summaries of a search (one row per trial directory, in its latest attempt's
  state), then optimization_history.png and param_importances.png."""
  from lmjax.sweep.study import DIR_ATTR
  latest: dict[str, Any] = {}
  for t in study.get_trials(deepcopy=False):  # by number: a retry replaces its first attempt
    if t.user_attrs.get(DIR_ATTR):
      latest[t.user_attrs[DIR_ATTR]] = t
  rows = write_summary(workdir, [Trial(name, dict(t.params)) for name, t in latest.items()],
                       {name: t.state.name.lower() for name, t in latest.items()})
  write_study_plots(study, workdir)
  return rows


def write_study_plots(study: Any, workdir: str) -> list[str]:
  """Optuna's optimisation history and parameter importances; returns the files written
  (importances need two complete trials)."""
  import warnings

  from optuna.trial import TrialState
  from optuna.visualization import matplotlib as vis
  _pyplot()
  complete = len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)))
  plots = [("optimization_history.png", vis.plot_optimization_history, 1),
           ("param_importances.png", vis.plot_param_importances, 2)]
  written = []
  for name, plot, needed in plots:
    if complete < needed:
      continue
    with warnings.catch_warnings():
      warnings.simplefilter("ignore")  # optuna's ExperimentalWarning for the matplotlib backend
      ax = plot(study)
    ax.figure.set_size_inches(8, 5)
    _save_png(ax.figure, paths.join(workdir, name))
    written.append(name)
  return written


def _pyplot() -> Any:
  import matplotlib
  matplotlib.use("Agg")  # files only, no display
  import matplotlib.pyplot as plt
  return plt


def _save_png(fig: Any, path: str) -> None:
  """The one PNG writer: a whole file (locally or in a bucket), the figure closed."""
  plt = _pyplot()
  fig.tight_layout()
  image = io.BytesIO()
  fig.savefig(image, format="png", dpi=100)
  plt.close(fig)
  paths.write_atomic(path, image.getvalue())
