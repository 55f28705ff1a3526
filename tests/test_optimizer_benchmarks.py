"""benchmarks.optimizers and benchmarks.wsd: their accounting on known curves, and each end to
end at toy size (the figures docs/scaling.md quotes come out of these code paths)."""

import json
import subprocess
import sys

import pytest

from tiny import ROOT


def _run(module, *args):
  proc = subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, capture_output=True,
                        text=True, timeout=1800)  # a dozen runs on a shared 2-core machine
  assert proc.returncode == 0, proc.stderr[-3000:]
  return proc.stdout


def test_tokens_to_a_loss_are_read_off_the_median_curve_between_evaluations():
  from benchmarks import curves
  runs = [[(50, 5.0), (100, 4.0), (150, 3.5)], [(50, 5.2), (100, 4.2), (150, 3.4)],
          [(50, 4.8), (100, 3.9), (150, 3.6)]]
  median = curves.median_curve(runs)
  assert median == [(50, 5.0), (100, 4.0), (150, 3.5)]
  assert curves.steps_to_reach(median, 4.5) == 75.0  # halfway between 50 and 100
  assert curves.steps_to_reach(median, 5.5) == 50.0  # already there at the first evaluation
  assert curves.steps_to_reach(median, 3.0) is None
  # a step only the other runs evaluated is left out of the median
  assert curves.median_curve([[(10, 1.0), (20, 0.5)], [(20, 0.7)]]) == [(20, 0.6)]


@pytest.fixture(scope="module")
def optimizers(tmp_path_factory):
  """One `benchmarks.optimizers` run for both tests: the step section (each optimizer's step
  time and state memory), then search (one rate), another seed and the PyTorch loop."""
  tmp = tmp_path_factory.mktemp("optimizers")
  out = tmp / "optimizers.json"
  stdout = _run("benchmarks.optimizers", "--quick", "--steps=6", "--eval_every=3",
                "--lrs=4e-3", "--seeds=0,1", "--sections=step,search,seeds,torch",
                f"--workdir={tmp / 'w'}", f"--json={out}")
  return stdout, json.loads(out.read_text())


def test_step_time_and_state_memory_of_every_optimizer(optimizers):
  (table,) = optimizers[1]["step"].values()  # optimizer_step.run(quick=True)'s one shape
  assert {"adamw", "muon", "adafactor", "lion", "schedule_free_adamw"} <= set(table)
  per_param = {k: r["bytes_per_param"] for k, r in table.items()}
  assert abs(per_param["adamw"] - 8) < 0.01 and abs(per_param["lion"] - 4) < 0.01
  assert per_param["adafactor"] < per_param["lion"] < per_param["muon"] < per_param["adamw"]
  assert table["adamw"]["step_vs_adamw"] == 1.0
  assert all(r["step_ms"] > 0 and r["update_ms"] > 0 for r in table.values())


def test_optimizers_benchmark_runs_small(optimizers):
  """Search (one rate), another seed and the PyTorch loop; the shorter budget is `seeds` at
  fewer steps."""
  stdout, r = optimizers
  assert r["search"]["adamw"]["best_lr"] == r["search"]["muon"]["best_lr"] == 4e-3
  for kind in ("adamw", "muon"):
    seeds = r["seeds"][kind]
    assert set(seeds["final"]) == {"0", "1"} and seeds["final"]["0"] != seeds["final"]["1"]
    # seed 0 is the search's own run, not trained again
    assert seeds["final"]["0"] == r["search"][kind]["losses"]["0.004"]
    assert [s for s, _ in seeds["median_curve"]] == [3, 6]
  assert set(r["torch"]["final"]) == {"0", "1"} and 0 < r["torch"]["median"] < 10
  assert r["challenger_to_baseline"]["target"] == r["seeds"]["adamw"]["median"]
  assert r["best_to_torch"]["target"] == r["torch"]["median"]
  assert "muon reaches adamw's median final loss" in stdout
  assert "PyTorch AdamW, seed 1: final held-out loss" in stdout


def test_wsd_benchmark_runs_small_and_its_branched_cooldowns_equal_separate_runs(tmp_path):
  out = tmp_path / "wsd.json"
  # 10 steps (warm-up 2): the two cooldowns of 1 and 2 steps from step 8, the separate
  # 10-step run the schedules' wsd run (its last 20%)
  stdout = _run("benchmarks.wsd", "--quick", "--steps=10", "--branch=8", "--cooldowns=1,2",
                "--warmup=2", "--seeds=0", f"--workdir={tmp_path / 'w'}", f"--json={out}")
  r = json.loads(out.read_text())
  assert set(r["schedules"]) == {"cosine", "wsd"}
  assert r["schedules"]["cosine"]["median"] != r["schedules"]["wsd"]["median"]
  c = r["cooldowns"]
  assert set(c["branched"]) == set(c["separate"]) == {"9", "10"}
  assert c["identical"] and c["branched"] == c["separate"]
  # the 20% wsd run of the schedules is the separate 10-step run
  assert c["separate"]["10"] == r["schedules"]["wsd"]["final"]["0"]
  assert c["steps"] == {"branched": 8 + 1 + 2, "separate": 9 + 10}
  assert "bit for bit the same" in stdout
