"""Warmup-stable-decay against cosine, and cooldowns branched from one stable run.

  python -m benchmarks.wsd [--lr 4e-3] [--steps 600] [--branch 480] [--cooldowns 40,80,120]
      [--seeds 0,1,2] [--parallel 2] [--workdir DIR] [--json F] [--quick] [--warmup 120]

clm_tiny, 16 rows of 128 tokens a step, AdamW at --lr (benchmarks.optimizers' choice),
warm-up 120 steps in every run (--quick: 12; --warmup N: N, for a smoke run of a few steps).

- schedules: cosine (to 0.1 of the peak, clm_tiny's) against wsd with a 20% cooldown
  (1-sqrt to 0, Hägele et al. 2024's recipe) at the same --steps, one run per seed: the
  median final held-out loss of each.
- cooldowns: one stable run (`schedule=constant`) to --branch steps, and from its
  checkpoint there one cooldown per length in --cooldowns, all from one sweep (a grid over
  train.steps with `train.branch_from=stable:BRANCH` and `optimizer.decay_start=BRANCH`
  fixed); against separate wsd runs of the same lengths from step 0, whose final losses
  they must equal bit for bit (the seed-0 wsd run of the schedules above is the separate
  run of length --steps when --branch is 80% of it). Reported: the losses and the
  training steps each way costs.
"""

from __future__ import annotations

import json
import os
import statistics
import tempfile
import time

from absl import app, flags

from benchmarks import curves
from launch.cli import cli_main

flags.DEFINE_float("lr", 4e-3, "AdamW's peak learning rate")
flags.DEFINE_integer("steps", 600, "steps of the schedule comparison")
flags.DEFINE_integer("branch", 480, "the stable run's length and the branch step")
flags.DEFINE_list("cooldowns", ["40", "80", "120"], "cooldown lengths branched from it")
flags.DEFINE_list("seeds", ["0", "1", "2"], "training seeds of the schedule comparison")
flags.DEFINE_integer("parallel", 2, "runs at once")
flags.DEFINE_bool("quick", False, "d64 x 2 layers, seq 64, short runs")
flags.DEFINE_integer("warmup", None, "warm-up steps of every run (default: 120, --quick 12)")
flags.DEFINE_string("workdir", "", "keep the runs here (default: a temporary directory)")
flags.DEFINE_string("json", "", "write the figures here")
FLAGS = flags.FLAGS
WARMUP = 120


def common(folder: str) -> dict:
  changes = {"train.batch_size": 16, "train.eval_batches": 16, "train.eval_every": 50,
             "train.log_every": 50, "optimizer.learning_rate": FLAGS.lr,
             "optimizer.warmup_steps": (FLAGS.warmup if FLAGS.warmup is not None else
                                        WARMUP // 10 if FLAGS.quick else WARMUP),
             "data.cache_dir": os.path.join(folder, "cache")}
  if FLAGS.quick:
    changes.update({"model.d_model": 64, "model.num_layers": 2, "model.d_ff": 256,
                    "data.seq_len": 64})
  return changes


WSD = {"optimizer.schedule": "wsd", "optimizer.decay_shape": "1-sqrt",
       "optimizer.end_lr_ratio": 0.0}


def finals(workdir: str, key: str) -> dict:
  return {t["overrides"][key]: t["curve"][-1][1] for t in curves.trials(workdir)}


def schedules(folder: str, steps: int) -> dict:
  """Cosine against wsd (20% cooldown) at the same steps, one run per seed each."""
  seeds = [int(s) for s in FLAGS.seeds]
  out = {}
  for name, fixed in (("cosine", {"optimizer.schedule": "cosine"}),
                      ("wsd", {**WSD, "optimizer.decay_fraction": 0.2})):
    sweep = curves.grid_file(os.path.join(folder, f"{name}.py"), {"train.seed": seeds}, fixed)
    workdir = os.path.join(folder, name)
    curves.run_sweep(sweep, workdir, curves.overrides({**common(folder), "train.steps": steps,
                                                       "train.checkpoint_every": steps}),
                     FLAGS.parallel)
    losses = finals(workdir, "train.seed")
    out[name] = {"final": {str(k): v for k, v in sorted(losses.items())},
                 "median": statistics.median(losses.values())}
    print(f"  {name}: final held-out loss by seed "
          + " ".join(f"{v:.4f}" for _, v in sorted(losses.items()))
          + f", median {out[name]['median']:.4f}", flush=True)
  return out


def cooldowns(folder: str, branch: int, lengths: list[int], steps: int) -> dict:
  """Cooldowns branched from one stable run, against separate wsd runs from step 0."""
  totals = [branch + c for c in lengths]
  stable = os.path.join(folder, "stable")
  start = time.time()
  curves.run_train(stable, curves.overrides({
      **common(folder), "train.steps": branch, "optimizer.schedule": "constant",
      "train.checkpoint_every": branch}))
  timed = {"stable": time.time() - start}
  out = {"branch": branch, "lengths": lengths}
  # the schedules' seed-0 wsd run (20% of --steps) is the separate run of that length
  reused = {}
  if round(0.2 * steps) == steps - branch and 0 in finals(os.path.join(folder, "wsd"),
                                                         "train.seed"):
    reused[steps] = finals(os.path.join(folder, "wsd"), "train.seed")[0]
  for name, fixed, grid in (
      ("branched", {"train.branch_from": f"{stable}:{branch}", "optimizer.decay_start": branch,
                    **WSD}, totals),
      ("separate", {"optimizer.decay_start": branch, **WSD}, [t for t in totals
                                                              if t not in reused])):
    sweep = curves.grid_file(os.path.join(folder, f"cool_{name}.py"), {"train.steps": grid},
                             fixed)
    start = time.time()
    curves.run_sweep(sweep, os.path.join(folder, f"cool_{name}"), curves.overrides(
        {**common(folder), "train.checkpoint_every": 10**6}), FLAGS.parallel)
    timed[name] = time.time() - start
    got = finals(os.path.join(folder, f"cool_{name}"), "train.steps")
    out[name] = {str(k): v for k, v in sorted({**got, **(reused if name == "separate"
                                                        else {})}.items())}
  out["identical"] = out["branched"] == out["separate"]
  out["steps"] = {"branched": branch + sum(lengths), "separate": sum(totals)}
  out["seconds"] = timed
  return out


def report(c: dict) -> None:
  print(f"  cooldowns from step {c['branch']} of one stable run: "
        + ", ".join(f"{length} steps -> {c['branched'][str(c['branch'] + length)]:.4f}"
                    for length in c["lengths"]), flush=True)
  print("  separate wsd runs of the same lengths: "
        + ", ".join(f"{t} -> {v:.4f}" for t, v in c["separate"].items())
        + f" ({'bit for bit the same' if c['identical'] else 'DIFFERENT'})")
  s = c["steps"]
  print(f"  training steps: branched {s['branched']} (stable {c['branch']} + cooldowns), "
        f"separate {s['separate']}: {s['branched'] / s['separate']:.2f}x")


@cli_main
def main(argv: list[str]) -> None:
  del argv
  steps = 60 if FLAGS.quick and not FLAGS["steps"].present else FLAGS.steps
  branch = 48 if FLAGS.quick and not FLAGS["branch"].present else FLAGS.branch
  lengths = [int(x) for x in FLAGS.cooldowns]
  if FLAGS.quick and not FLAGS["cooldowns"].present:
    lengths = [4, 8, 12]
  with tempfile.TemporaryDirectory() as tmp:
    folder = FLAGS.workdir or tmp
    os.makedirs(folder, exist_ok=True)
    print("== schedules", flush=True)
    out = {"lr": FLAGS.lr, "steps": steps, "schedules": schedules(folder, steps)}
    print("== cooldowns", flush=True)
    out["cooldowns"] = cooldowns(folder, branch, lengths, steps)
    report(out["cooldowns"])
  if FLAGS.json:
    with open(FLAGS.json, "w") as f:
      json.dump(out, f, indent=2)


if __name__ == "__main__":
  app.run(main)
