"""Optimizers on clm_tiny's data: Muon against AdamW, the best against the PyTorch AdamW loop,
and each optimizer's step time and state memory.

  python -m benchmarks.optimizers [--sections step,search,seeds,short,torch] [--steps 600]
      [--kinds adamw,muon] [--lrs 2e-3,4e-3,8e-3,1.6e-2,3.2e-2] [--seeds 0,1,2]
      [--short 0.8] [--parallel 2] [--workdir DIR] [--json F] [--quick]

- step: the train step and the update alone (`tx.update` + apply, jitted) of every
  registered optimizer on the same model, timed interleaved (minimum of the repeats), and
  the optimizer state's bytes: clm_tiny's shape and a wider one (d512); --quick: d128 x 2.
- search: each of --kinds at each learning rate of --lrs, clm_tiny at --steps steps of 16
  rows of 128 tokens (600: clm_tiny's own token budget), warm-up steps/5, through
  `launch.sweep` (lmjax's own sweep; the same grid, so the same budget, for each); the
  lowest final held-out loss picks each optimizer's rate.
- seeds: each at its rate under the other training seeds (--seeds; `train.seed` draws the
  parameters and the data order): the median final held-out loss, and the tokens the
  challenger (Muon) needs to reach AdamW's, read off its median eval curve (target <=0.8x).
- short: the challenger trained to --short x the steps with its whole schedule (warm-up
  scaled), three seeds: does it reach AdamW's median at that budget?
- torch: the plain PyTorch AdamW loop (`benchmarks/torch_loop.py`) on identical tokens at
  AdamW's rate, three seeds; the tokens the best optimizer needs to reach its loss.
"""

from __future__ import annotations

import functools
import json
import os
import statistics
import tempfile
import time

from absl import app, flags

from benchmarks import curves
from launch.cli import cli_main

flags.DEFINE_list("sections", ["step", "search", "seeds", "short", "torch"], "what to run")
flags.DEFINE_integer("steps", 600, "training steps of a run")
flags.DEFINE_list("kinds", ["adamw", "muon"], "optimizers compared (the first is the baseline)")
flags.DEFINE_list("lrs", ["2e-3", "4e-3", "8e-3", "1.6e-2", "3.2e-2"], "learning-rate grid")
flags.DEFINE_list("seeds", ["0", "1", "2"], "training seeds at the chosen rate")
flags.DEFINE_float("short", 0.8, "the challenger's shorter budget, as a fraction of --steps")
flags.DEFINE_integer("eval_every", 50, "steps between evaluations (the curves' resolution)")
flags.DEFINE_integer("parallel", 2, "runs at once")
flags.DEFINE_bool("quick", False, "d64 x 2 layers, seq 64, 60 steps (unless --steps)")
flags.DEFINE_string("workdir", "", "keep the runs here (default: a temporary directory)")
flags.DEFINE_string("json", "", "write the figures here")
FLAGS = flags.FLAGS
BATCH, EVAL_BATCHES = 16, 16


def base_overrides(folder: str, steps: int) -> dict:
  changes = {"train.steps": steps, "train.batch_size": BATCH, "train.eval_batches": EVAL_BATCHES,
             "train.eval_every": FLAGS.eval_every, "train.log_every": 50,
             "train.checkpoint_every": steps, "optimizer.warmup_steps": steps // 5,
             "data.cache_dir": os.path.join(folder, "cache")}
  if FLAGS.quick:
    changes.update({"model.d_model": 64, "model.num_layers": 2, "model.d_ff": 256,
                    "data.seq_len": 64})
  return changes


def search(folder: str, kind: str, steps: int) -> dict:
  """Every rate of the grid at seed 0; the best by final held-out loss."""
  workdir = os.path.join(folder, f"search_{kind}")
  sweep = curves.grid_file(os.path.join(folder, f"search_{kind}.py"),
                           {"optimizer.learning_rate": [float(x) for x in FLAGS.lrs]},
                           {"optimizer.kind": kind})
  start = time.time()
  curves.run_sweep(sweep, workdir, curves.overrides(base_overrides(folder, steps)),
                   FLAGS.parallel)
  losses = {t["overrides"]["optimizer.learning_rate"]: t["curve"][-1][1]
            for t in curves.trials(workdir)}
  best = min(losses, key=losses.get)
  print(f"  {kind}: final held-out loss by learning rate (seed 0): "
        + ", ".join(f"{lr:g} {loss:.4f}" for lr, loss in sorted(losses.items()))
        + f" -> {best:g}{' (an edge of the grid)' if best in (min(losses), max(losses)) else ''}",
        flush=True)
  return {"losses": {str(k): v for k, v in sorted(losses.items())}, "best_lr": best,
          "seconds": time.time() - start}


def seeds(folder: str, kind: str, lr: float, steps: int, tag: str = "") -> dict:
  """Runs at `lr` under each of --seeds: their eval curves (seed 0 from the search when the
  step count is the search's)."""
  wanted = [int(s) for s in FLAGS.seeds]
  runs: dict[int, list] = {}
  if steps == FLAGS.steps and 0 in wanted and os.path.isdir(os.path.join(folder, f"search_{kind}")):
    for t in curves.trials(os.path.join(folder, f"search_{kind}")):
      if t["overrides"]["optimizer.learning_rate"] == lr:
        runs[0] = t["curve"]
  todo = [s for s in wanted if s not in runs]
  if todo:
    workdir = os.path.join(folder, f"seeds_{kind}{tag}")
    changes = base_overrides(folder, steps)
    sweep = curves.grid_file(os.path.join(folder, f"seeds_{kind}{tag}.py"), {"train.seed": todo},
                             {"optimizer.kind": kind, "optimizer.learning_rate": lr,
                              "optimizer.warmup_steps": changes.pop("optimizer.warmup_steps")})
    curves.run_sweep(sweep, workdir, curves.overrides(changes), FLAGS.parallel)
    for t in curves.trials(workdir):
      runs[t["overrides"]["train.seed"]] = t["curve"]
  finals = [runs[s][-1][1] for s in wanted]
  return {"lr": lr, "steps": steps, "final": dict(zip(map(str, wanted), finals)),
          "median": statistics.median(finals),
          "median_curve": curves.median_curve([runs[s] for s in wanted])}


def torch_peer(folder: str, lr: float, steps: int) -> dict:
  """The PyTorch AdamW loop on identical tokens, one run per seed."""
  from benchmarks import torch_loop
  from experiments import clm_tiny
  from lmjax.experiment import experiment_from_dict
  runs = {}
  for seed in (int(s) for s in FLAGS.seeds):
    config = clm_tiny.get_config()
    for key, value in {**base_overrides(folder, steps), "optimizer.learning_rate": lr,
                       "train.seed": seed}.items():
      section, field = key.split(".")
      config[section][field] = value
    start = time.time()
    runs[seed] = torch_loop.train(experiment_from_dict(config.to_dict()))
    print(f"  PyTorch AdamW, seed {seed}: final held-out loss {runs[seed][-1][1]:.4f} "
          f"({time.time() - start:.0f} s)", flush=True)
  finals = [c[-1][1] for c in runs.values()]
  return {"lr": lr, "final": {str(k): c[-1][1] for k, c in runs.items()},
          "median": statistics.median(finals),
          "median_curve": curves.median_curve(list(runs.values()))}


def tokens_to(result: dict, target: float, steps: int) -> dict:
  """When a median curve first reaches `target`: steps, tokens, fraction of `steps`."""
  reached = curves.steps_to_reach(result["median_curve"], target)
  seq = 64 if FLAGS.quick else 128
  return {"target": target, "steps": reached,
          "tokens": None if reached is None else reached * BATCH * seq,
          "fraction": None if reached is None else reached / steps}


def compare(out: dict, steps: int) -> None:
  """The challenger's tokens to the baseline's final loss, and the best against PyTorch."""
  base, challenger = FLAGS.kinds[0], FLAGS.kinds[1] if len(FLAGS.kinds) > 1 else None
  seeds_ = out.get("seeds", {})
  if challenger and base in seeds_ and challenger in seeds_:
    reach = tokens_to(seeds_[challenger], seeds_[base]["median"], steps)
    out["challenger_to_baseline"] = reach
    frac = reach["fraction"]
    print(f"  {challenger} reaches {base}'s median final loss {seeds_[base]['median']:.4f} at "
          + (f"{frac:.2f}x of its tokens (target <= 0.8x: {'met' if frac <= 0.8 else 'NOT met'})"
             if frac is not None else "no point of its run (target NOT met)"), flush=True)
  if "torch" in out and seeds_:
    best = min(seeds_, key=lambda k: seeds_[k]["median"])
    reach = tokens_to(seeds_[best], out["torch"]["median"], steps)
    out["best_to_torch"] = {"kind": best, **reach}
    frac = reach["fraction"]
    print(f"  best lmjax optimizer {best} reaches PyTorch AdamW's median {out['torch']['median']:.4f}"
          f" at " + (f"{frac:.2f}x of its tokens (target <= 0.8x: "
                     f"{'met' if frac <= 0.8 else 'NOT met'})" if frac is not None else
                     "no point of its run (target NOT met)"), flush=True)


@cli_main
def main(argv: list[str]) -> None:
  del argv
  steps = 60 if FLAGS.quick and not FLAGS["steps"].present else FLAGS.steps
  with tempfile.TemporaryDirectory() as tmp:
    folder = FLAGS.workdir or tmp
    os.makedirs(folder, exist_ok=True)
    out: dict = {"steps": steps, "batch": BATCH, "kinds": FLAGS.kinds, "seconds": {}}
    run = functools.partial(_section, out, folder, steps)
    for name in FLAGS.sections:
      start = time.time()
      run(name)
      out["seconds"][name] = time.time() - start
    compare(out, steps)
  if FLAGS.json:
    with open(FLAGS.json, "w") as f:
      json.dump(out, f, indent=2)


def _section(out: dict, folder: str, steps: int, name: str) -> None:
  print(f"== {name}", flush=True)
  if name == "step":
    from benchmarks import optimizer_step
    out["step"] = optimizer_step.run(quick=FLAGS.quick)
  elif name == "search":
    out["search"] = {kind: search(folder, kind, steps) for kind in FLAGS.kinds}
  elif name == "seeds":
    out["seeds"] = {}
    for kind in FLAGS.kinds:
      r = out["seeds"][kind] = seeds(folder, kind, out["search"][kind]["best_lr"], steps)
      print(f"  {kind} at lr {r['lr']:g}: final held-out loss by seed "
            + " ".join(f"{v:.4f}" for v in r["final"].values()) + f", median {r['median']:.4f}",
            flush=True)
  elif name == "short":
    kind = FLAGS.kinds[1]
    short = round(steps * FLAGS.short)
    r = out["short"] = seeds(folder, kind, out["search"][kind]["best_lr"], short, "_short")
    base = out["seeds"][FLAGS.kinds[0]]["median"]
    print(f"  {kind} at {short} steps ({FLAGS.short:.2f}x): median {r['median']:.4f} against "
          f"{FLAGS.kinds[0]}'s {base:.4f} at {steps}: "
          f"{'reached' if r['median'] <= base else 'NOT reached'}", flush=True)
  elif name == "torch":
    out["torch"] = torch_peer(folder, out["search"][FLAGS.kinds[0]]["best_lr"], steps)


if __name__ == "__main__":
  app.run(main)
