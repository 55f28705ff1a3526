"""Mixture of experts against dense models: held-out loss, step time and load balance.

  python -m benchmarks.moe --workdir runs/moe_bench [--seeds 0,1] [--steps 300]
      [--sections loss,time] [--parallel 3] [--repeats 5] [--json results/moe.json]

loss: trains `clm_tiny`, `moe_tiny` (the same data, tokens and active parameters) and
`moe_tiny` without the load-balancing loss (`model.moe.balance_loss=0`) through
`launch.train`, once per seed (--parallel at a time; a finished run in --workdir is read,
an unfinished one resumed), and prints each run's held-out loss at the end and the
experts' load over training (from the `router_load/...` shares every eval writes: the
busiest expert's share x num_experts, 1.0 when balanced, and the share of experts with
under a quarter of a fair load, both averaged over layers).
time: one train step at clm_tiny's shape (batch 32 x 128, float32) of clm_tiny, of
moe_tiny dropless (the tiled grouped matmul CPU uses, and `jax.lax.ragged_dot`, which
XLA:CPU computes densely), of moe_tiny with one-hot capacity dispatch (factor 1.25), and
of a dense model of moe_tiny's total parameters (d_ff 2048); interleaved, min and median
of --repeats calls of 5 steps. docs/moe.md has the figures.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
from absl import app, flags

flags.DEFINE_string("workdir", None, "where the training runs go", required=True)
flags.DEFINE_string("seeds", "0,1", "comma-separated seeds of the loss section")
flags.DEFINE_integer("steps", 300, "training steps of each run (clm_tiny's budget: 300)")
flags.DEFINE_string("sections", "loss,time", "which sections to run")
flags.DEFINE_integer("repeats", 5, "timed calls per candidate in the time section")
flags.DEFINE_integer("parallel", 1, "loss section: training runs at a time")
flags.DEFINE_bool("train", True, "loss section: train the runs (false: report the runs in "
                  "--workdir as far as they got, at the evaluations they all reached)")
flags.DEFINE_string("json", None, "write every figure here")
FLAGS = flags.FLAGS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUNS = {"clm_tiny": ("experiments/clm_tiny.py", []),
        "moe_tiny": ("experiments/moe_tiny.py", []),
        "moe_tiny_no_balance": ("experiments/moe_tiny.py", ["--config.model.moe.balance_loss=0"])}


def train(name: str, seed: int, steps: int, workdir: str, launch: bool = True) -> list[dict]:
  """Trains one run through launch.train (unless `launch` is false); its metrics.jsonl
  records ([] if it has none), the last record of each (step, split)."""
  config, extra = RUNS[name]
  out = os.path.join(workdir, f"{name}_seed{seed}")
  if launch and not os.path.exists(os.path.join(out, "results.json")):  # else read it
    _launch(config, extra, out, seed, steps)
  path = os.path.join(out, "metrics.jsonl")
  if not os.path.exists(path):
    return []
  with open(path) as f:  # a resumed run repeats the steps after its checkpoint
    records = {(r["step"], r["split"]): r for r in map(json.loads, f)}
  return sorted(records.values(), key=lambda r: r["step"])


def _launch(config: str, extra: list[str], out: str, seed: int, steps: int) -> None:
  cmd = [sys.executable, "-m", "launch.train", f"--config={config}", f"--workdir={out}",
         f"--config.train.seed={seed}", f"--config.train.steps={steps}", *extra]
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=3600)
  if proc.returncode:
    raise RuntimeError(f"{out} failed:\n{proc.stderr[-3000:]}")
  print(f"trained {out}", flush=True)


def load_balance(record: dict) -> tuple[float, float]:
  """(busiest expert's share x E, share of experts under a quarter of a fair load),
  averaged over the layers of one eval record."""
  layers: dict[str, list[float]] = {}
  for key, value in record.items():
    if key.startswith("router_load/"):
      layers.setdefault(key.split("/")[1], []).append(value)
  if not layers:
    return float("nan"), float("nan")
  peak = [max(v) * len(v) for v in layers.values()]
  starved = [np.mean(np.asarray(v) < 0.25 / len(v)) for v in layers.values()]
  return float(np.mean(peak)), float(np.mean(starved))


def loss_section(seeds: list[int], steps: int, workdir: str, parallel: int,
                 launch: bool) -> dict:
  from concurrent.futures import ThreadPoolExecutor
  jobs = [(name, seed) for seed in seeds for name in RUNS]
  with ThreadPoolExecutor(parallel) as pool:
    done = list(pool.map(lambda job: train(*job, steps, workdir, launch), jobs))
  results = {f"{name}/seed{seed}": {
      "eval_loss": {r["step"]: r["loss"] for r in records if r["split"] == "eval"},
      "balance_loss": {r["step"]: r.get("router_balance") for r in records
                       if r["split"] == "train"},
      "load": {r["step"]: load_balance(r) for r in records if r["split"] == "eval"}}
      for (name, seed), records in zip(jobs, done) if records}
  if results:
    _print_loss_table(results, seeds)
  return results


def _print_loss_table(results: dict, seeds: list[int]) -> None:
  """Each run's held-out loss, balance loss and load at every evaluation step any run
  reached ("-" where it did not get there), and per configuration the mean over seeds."""
  steps = sorted(set().union(*(r["eval_loss"] for r in results.values())))
  at = lambda d, s, fmt: "-" if d.get(s) is None else fmt.format(d[s])
  print(f"\n| run | seed | held-out loss at step {' / '.join(map(str, steps))} | balance loss "
        "(train line, same steps) | load at those steps: busiest expert's share x E, "
        "experts under 1/4 of a fair share |")
  print("| --- | --- | --- | --- | --- |")
  for key, r in results.items():
    name, seed = key.split("/")
    losses = " / ".join(at(r["eval_loss"], s, "{:.4f}") for s in steps)
    bal = " / ".join(at(r["balance_loss"], s, "{:.3f}") for s in steps)
    load = " ; ".join(f"{r['load'][s][0]:.2f}, {r['load'][s][1]:.0%}" for s in steps
                      if s in r["load"] and not np.isnan(r["load"][s][0])) or "-"
    print(f"| {name} | {seed[4:]} | {losses} | {bal} | {load} |")
  for name in RUNS:
    for s in steps:
      got = [r["eval_loss"][s] for k, r in results.items()
             if k.split("/")[0] == name and s in r["eval_loss"]]
      if got:
        print(f"{name}: held-out loss at step {s}: mean {np.mean(got):.4f} over "
              f"{len(got)} seed(s) ({', '.join(f'{g:.4f}' for g in got)})")


def time_section(repeats: int) -> dict:
  from benchmarks.train_step import Shape, lmjax_step, time_interleaved
  from experiments import clm_tiny, moe_tiny
  from lmjax.experiment import experiment_from_dict
  model = lambda c: experiment_from_dict(c.to_dict()).model.replace(dtype="float32")
  dense, moe = model(clm_tiny.get_config()), model(moe_tiny.get_config())
  shape = Shape("clm", d_model=128, layers=4, seq_len=128, batch=32, vocab=2048, heads=4)
  m = moe.moe
  candidates = {
      "clm_tiny (dense, d_ff 512)": dense,
      "moe_tiny dropless, tiled grouped matmul": moe.replace(moe=m.replace(
          grouped_matmul="tiled")),
      "moe_tiny dropless, jax.lax.ragged_dot": moe.replace(moe=m.replace(
          grouped_matmul="ragged_dot")),
      "moe_tiny one-hot capacity 1.25": moe.replace(moe=m.replace(dispatch="capacity")),
      "dense of moe_tiny's total (d_ff 2048)": dense.replace(d_ff=m.num_experts * m.d_ff)}
  steps = 5
  times = time_interleaved({k: lmjax_step(shape, steps, cfg) for k, cfg in
                            candidates.items()}, repeats)
  base = times["clm_tiny (dense, d_ff 512)"][0]
  print(f"\n| step at clm_tiny's shape (float32) | min ms | median ms | vs clm_tiny |")
  print("| --- | --- | --- | --- |")
  for name, (lo, med) in times.items():
    print(f"| {name} | {lo / steps * 1e3:.0f} | {med / steps * 1e3:.0f} | {lo / base:.2f}x |")
  return {k: {"min_ms": lo / steps * 1e3, "median_ms": med / steps * 1e3}
          for k, (lo, med) in times.items()}


def main(argv):
  del argv
  sections = FLAGS.sections.split(",")
  unknown = set(sections) - {"loss", "time"}
  if unknown:
    raise app.UsageError(f"unknown sections {sorted(unknown)}; known: loss, time")
  out = {}
  if "loss" in sections:
    out["loss"] = loss_section([int(s) for s in FLAGS.seeds.split(",")], FLAGS.steps,
                               FLAGS.workdir, FLAGS.parallel, FLAGS.train)
  if "time" in sections:
    out["time"] = time_section(FLAGS.repeats)
  if FLAGS.json:
    os.makedirs(os.path.dirname(os.path.abspath(FLAGS.json)), exist_ok=True)
    with open(FLAGS.json, "w") as f:
      json.dump(out, f, indent=1, default=str)


if __name__ == "__main__":
  app.run(main)
