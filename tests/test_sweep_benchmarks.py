"""benchmarks.sweep and benchmarks.mup: their accounting on known inputs, and each end to
end at toy size (the figures their closing notes quote come out of these code paths)."""

import csv
import json
import subprocess
import sys

import pytest

from tiny import ROOT


def _python(code, *args):
  proc = subprocess.run([sys.executable, "-c", code, *args], cwd=ROOT, capture_output=True,
                        text=True, timeout=120)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return proc.stdout


def _run(module, *args):
  proc = subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, capture_output=True,
                        text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return proc.stdout


_SPENT = """
import json, os, sys
from benchmarks.sweep import spent
folder = sys.argv[1]
trials = {"a": ("complete", [("train", 10), ("eval", 12), ("train", 20), ("eval", 24)], 3.5),
          "b": ("pruned", [("train", 10), ("eval", 12)], 4.0),
          "c": ("complete", [("train", 10), ("train", 20), ("eval", 24)], 3.0)}
rows = ["trial,status,final_eval_loss"]
for name, (status, records, loss) in trials.items():
  os.makedirs(os.path.join(folder, name))
  with open(os.path.join(folder, name, "metrics.jsonl"), "w") as f:
    f.writelines(json.dumps({"split": a, "step": b, "loss": loss}) + "\\n" for a, b in records)
  rows.append(f"{name},{status},{loss}")
with open(os.path.join(folder, "summary.csv"), "w") as f:
  f.write("\\n".join(rows) + "\\n")
print(spent(folder))
"""


def test_search_steps_count_to_a_pruned_trials_last_eval(tmp_path):
  """Each benchmark module defines its own absl flags: checked in a process of its own."""
  assert _python(_SPENT, str(tmp_path)).strip() == "(60, 3.0)"  # 24 + 12 (pruned) + 24


def test_search_benchmark_runs_small(tmp_path):
  """A 2-point grid against a 1-trial search, 5 steps a trial; both points with seed 1."""
  out = tmp_path / "sweep.json"
  stdout = _run("benchmarks.sweep", "--quick", "--steps=5", "--grid_lrs=1", "--trials=1",
                "--seeds=0", "--seed_spread=1", f"--workdir={tmp_path / 'w'}", f"--json={out}")
  result = json.loads(out.read_text())
  assert result["grid"]["steps"] == 2 * 5 and result["search"]["0"]["steps"] == 5
  for side in (result["grid"], result["search"]["0"]):
    assert 0 < side["best"] < 10
  assert result["targets"][1]["share"] == 0.5
  assert "grid (2 points)" in stdout and "TPE + ASHA (1 trials, seed 0)" in stdout
  spread = result["seed_spread"]  # grid point -> loss under train.seed 0, 1
  assert len(spread) == 2 and all(len(v) == 2 and 0 < min(v) < 10 for v in spread.values())
  assert min(v[0] for v in spread.values()) == result["grid"]["best"]
  assert any(v[0] != v[1] for v in spread.values())  # another seed, another run
  assert "held-out loss under train.seed 0..1" in stdout


@pytest.mark.parametrize("flag, message", [
    ("--warmup_step=5", "--warmup_step 5 does not divide the longest warm-up, 2"),
    ("--tpe={x", "--tpe is not JSON"),
    ('--tpe={"n_startup": 5}', "--tpe: sampler_options: "),
    ("--grid_figures=4.0", "--grid_figures takes BEST,STEPS, got 4.0"),
    ("--grid_figures=4.0,x", "--grid_figures takes BEST,STEPS"),
])
def test_search_benchmark_refuses_bad_flags_before_the_grid(tmp_path, flag, message):
  proc = subprocess.run([sys.executable, "-m", "benchmarks.sweep", "--quick", "--steps=10", flag,
                         f"--workdir={tmp_path}"], cwd=ROOT, capture_output=True, text=True,
                        timeout=120)
  assert proc.returncode == 2 and "Traceback" not in proc.stderr
  assert message in proc.stderr.strip().splitlines()[-1]
  assert not (tmp_path / "grid").exists()


def test_search_benchmark_takes_an_earlier_grid_s_figures_and_two_workers(tmp_path):
  """--grid_figures: no grid trained, its figures compared; --parallel 2: two workers."""
  out = tmp_path / "sweep.json"
  stdout = _run("benchmarks.sweep", "--quick", "--steps=5", "--trials=2", "--seeds=0",
                "--grid_figures=5.5,160", "--parallel=2", f"--workdir={tmp_path / 'w'}",
                f"--json={out}")
  result = json.loads(out.read_text())
  assert result["grid"] == {"best": 5.5, "steps": 160} and not (tmp_path / "w" / "grid").exists()
  assert "(an earlier run)" in stdout
  with open(tmp_path / "w" / "search_0" / "summary.csv") as f:
    rows = list(csv.DictReader(f))
  assert len(rows) == 2 and len({r["overrides"] for r in rows}) == 2  # two points
  # Two workers race to ASHA's first rung (step 1), so either may be stopped there: the steps
  # spent are 5 for each complete trial plus where each stopped one ended.
  ended = [5 if r["status"] == "complete" else _last_step(tmp_path / "w" / "search_0" / r["trial"])
           for r in rows]
  assert result["search"]["0"]["steps"] == sum(ended) and ended.count(5) >= 1


def _last_step(trial_dir):
  records = [json.loads(x) for x in open(trial_dir / "metrics.jsonl") if x.strip()]
  return max(r["step"] for r in records)


def test_search_benchmark_refuses_a_seed_spread_without_its_grid(tmp_path):
  proc = subprocess.run([sys.executable, "-m", "benchmarks.sweep", "--quick",
                         "--grid_figures=4.0,100", "--seed_spread=1", f"--workdir={tmp_path}"],
                        cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert proc.returncode == 2 and "--seed_spread retrains the grid's best points" in \
      proc.stderr.strip().splitlines()[-1]


_SEEDS = """
from absl import flags
from benchmarks import sweep
flags.FLAGS(["sweep"])
result = sweep.report((1000, 4.0), {0: (400, 4.03), 1: (450, 4.005), 2: (520, 4.0)})
assert abs(result["targets"][0]["gap"] - 0.005) < 1e-9 and result["targets"][0]["met"]
assert result["targets"][1]["share"] == 0.52 and not result["targets"][1]["met"]
assert abs(result["search"]["0"]["gap"] - 0.03) < 1e-9
"""


def test_search_benchmark_judges_the_median_seed_and_the_costliest():
  """One lucky seed does not meet the gap target; one costly seed fails the budget."""
  stdout = _python(_SEEDS)
  assert "seed 0): best 4.0300 (+0.0300 nats)" in stdout and "NOT met" in stdout


_REPORT = """
from absl import flags
from benchmarks import mup
flags.FLAGS(["mup"])
loss = {"sp": {64: {0.01: 3.0, 0.001: 3.5}, 128: {0.01: 3.4, 0.001: 2.9}},
        "mup": {64: {0.01: 3.0, 0.001: 3.5}, 128: {0.01: 2.8, 0.001: 3.1}}}
result = mup.report(loss, [64, 128], [0.001, 0.01])
assert result["best_lr"] == {"sp": {"64": 0.01, "128": 0.001},
                             "mup": {"64": 0.01, "128": 0.01}}, result
assert abs(result["transfer_gap"]["sp"]["128"] - 0.5) < 1e-9
assert result["transfer_gap"]["mup"]["128"] == 0.0 and result["targets"][0]["met"]
"""


def test_mup_report_finds_the_best_rate_per_width_and_the_transfer_gap():
  assert "met (SP: 2 different winners)" in _python(_REPORT)


def test_mup_benchmark_runs_small(tmp_path):
  out, plot = tmp_path / "mup.json", tmp_path / "mup.png"
  stdout = _run("benchmarks.mup", "--widths=32,64", "--lrs=1e-2", "--steps=2", "--layers=1",
                f"--json={out}", f"--plot={plot}")
  result = json.loads(out.read_text())
  assert result["best_lr"] == {p: {"32": 1e-2, "64": 1e-2} for p in ("sp", "mup")}
  # At the base width µP is SP: the same loss; wider, it is another model.
  assert result["loss"]["sp"]["32"] == result["loss"]["mup"]["32"]
  assert result["loss"]["sp"]["64"] != result["loss"]["mup"]["64"]
  assert plot.stat().st_size > 0 and "target: under µP" in stdout
