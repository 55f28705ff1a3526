"""benchmarks.sweep and benchmarks.mup end to end at toy size: the figures their closing
notes quote come out of these code paths."""

import json
import subprocess
import sys

from tiny import ROOT


def _run(module, *args):
  proc = subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, capture_output=True,
                        text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return proc.stdout


def test_search_benchmark_counts_steps_and_compares_bests(tmp_path):
  """A 2-point grid against a 2-trial search, 6 steps a trial: the grid spends every step;
  the search spends at most as many and a pruned trial counts up to its stopping eval."""
  out = tmp_path / "sweep.json"
  stdout = _run("benchmarks.sweep", "--quick", "--steps=6", "--grid_lrs=1", "--trials=2",
                f"--workdir={tmp_path / 'w'}", f"--json={out}")
  result = json.loads(out.read_text())
  assert result["grid"]["steps"] == 2 * 6
  assert 1 <= result["search"]["steps"] <= 2 * 6
  for side in ("grid", "search"):
    assert 0 < result[side]["best"] < 10
  gap = result["targets"][0]
  assert abs(gap["gap"] - (result["search"]["best"] - result["grid"]["best"])) < 1e-9
  assert "grid (2 points)" in stdout and "TPE + ASHA (2 trials)" in stdout
  summary = (tmp_path / "w" / "search" / "summary.csv").read_text()
  assert summary.count("complete") + summary.count("pruned") == 2


def test_mup_benchmark_reports_best_learning_rates_per_width(tmp_path):
  out, plot = tmp_path / "mup.json", tmp_path / "mup.png"
  stdout = _run("benchmarks.mup", "--widths=32,64", "--lrs=1e-3,1e-2", "--steps=3",
                "--layers=1", f"--json={out}", f"--plot={plot}")
  result = json.loads(out.read_text())
  for p in ("sp", "mup"):
    assert set(result["best_lr"][p]) == {"32", "64"}
    assert set(result["best_lr"][p].values()) <= {1e-3, 1e-2}
    losses = result["loss"][p]["64"]
    assert result["best_lr"][p]["64"] == float(min(losses, key=losses.get))
    assert result["transfer_gap"][p]["32"] == 0.0 and result["transfer_gap"][p]["64"] >= 0
  # At the base width µP is SP: the same losses.
  assert result["loss"]["sp"]["32"] == result["loss"]["mup"]["32"]
  assert plot.stat().st_size > 0 and "target: under µP" in stdout
