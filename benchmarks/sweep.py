"""Search against grid: TPE with ASHA against a 16-point grid on clm_tiny, through launch.sweep.

  python -m benchmarks.sweep [--quick] [--steps 600] [--json F] [--workdir DIR]
      [--grid_lrs 8] [--trials 16] [--seeds 0,1,2] [--tpe JSON] [--warmup_step 1]
      [--seed_spread 0] [--parallel 1] [--grid_figures BEST,STEPS]

Both search the same space, the learning rate (log 3e-4 to 3e-2) and the warm-up steps;
the grid takes 8 learning rates x 2 warm-ups, every trial to the end, and the search 16
TPE trials (5 random first) that ASHA stops at rungs of 4/15 and 4/5 of the steps
(reduction factor 3), both after the longest warm-up: a trial still warming up would be
ranked on a learning rate it has not reached. The search runs once per sampler seed
(--seeds): one seed's result is a draw, and a search that finds the answer must do so
typically. Reported: the best held-out loss of the grid and of each search, the difference
(target: the median search within 0.01 nats of the grid's best) and the training steps
each spent (target: every search <= 50% of the grid's).

--parallel N runs N grid trials at once and N search workers on each study. The grid
is deterministic: run again with the same --workdir, its finished trials are read rather
than retrained; with the directory gone, --grid_figures takes its best loss and steps
from the earlier run's report.

--seed_spread N retrains the grid's two best points with train.seed 1..N (the parameters
and the data order): how far one run's loss moves by chance, against the 0.01-nat target.

600 steps of 16 sequences by default: clm_tiny's own token budget (300 steps of 32) and,
in tokens, the schedule of the shipped experiments/sweeps/lr_optuna.py (rungs at 160 and
480 here, at 80 and 240 there; warm-up up to 120 here, 60 there). At 300 steps the median
search missed the target by 0.01 nats, less than one run moves with its seed; at 150 the
ranking was a lottery: a trial was still escaping its first plateau, and the same learning
rate scored 0.46 nats apart with and without warm-up (docs/scaling.md).
"""

from __future__ import annotations

import csv
import json
import os
import statistics
import subprocess
import sys
import tempfile

from absl import app, flags

from launch.cli import cli_main
from lmjax.errors import UserError
from lmjax.sweep import IntUniform, Search

flags.DEFINE_bool("quick", False, "a d64 x 2-layer clm_tiny and 60 steps (unless --steps)")
flags.DEFINE_integer("steps", 600, "training steps of a trial run to its end")
flags.DEFINE_integer("grid_lrs", 8, "learning rates of the grid (x 2 warm-ups: its points)")
flags.DEFINE_integer("trials", 16, "trials of the search")
flags.DEFINE_string("tpe", '{"n_startup_trials": 5}', "TPESampler options, as JSON")
flags.DEFINE_integer("warmup_step", 1, "the search's warm-up lattice (must divide steps / 5)")
flags.DEFINE_integer("seed_spread", 0, "retrain the grid's two best points, train.seed 1..N")
flags.DEFINE_list("seeds", ["0", "1", "2"], "sampler seeds: one search each")
flags.DEFINE_integer("parallel", 1, "trials at once (grid: --parallel, search: --workers)")
flags.DEFINE_list("grid_figures", [], "BEST,STEPS: the grid's best held-out loss and training "
                  "steps from an earlier run with the same flags, instead of training the grid")
flags.DEFINE_string("workdir", "", "keep the sweeps here (default: a temporary directory)")
flags.DEFINE_string("json", "", "write the figures here")
FLAGS = flags.FLAGS
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def grid_lrs(n: int) -> list[float]:
  """n learning rates log-spaced over 3e-4 .. 3e-2 (the search's range)."""
  return [3e-4 * 100 ** (k / max(n - 1, 1)) for k in range(n)]


def grid_file(folder: str, steps: int) -> str:
  warmups = [0, steps // 5]
  grid = os.path.join(folder, "grid.py")
  with open(grid, "w") as f:
    f.write("from lmjax.sweep import Sweep\n\n\ndef get_sweep():\n"
            f"  return Sweep(grid={{'optimizer.learning_rate': {grid_lrs(FLAGS.grid_lrs)!r}, "
            f"'optimizer.warmup_steps': {warmups!r}}})\n")
  return grid


def search_file(folder: str, steps: int, seed: int) -> str:
  rung = max(steps * 4 // 15, 1)  # after the longest warm-up (steps // 5): ranks trained runs
  search = os.path.join(folder, f"search_{seed}.py")
  with open(search, "w") as f:
    f.write("from lmjax.sweep import IntUniform, LogUniform, Search\n\n\n"
            "def get_sweep():\n  return Search(\n"
            "      space={'optimizer.learning_rate': LogUniform(3e-4, 3e-2),\n"
            f"             'optimizer.warmup_steps': IntUniform(0, {steps // 5}, "
            f"step={FLAGS.warmup_step})}},\n"
            f"      sampler='tpe', pruner='asha', num_trials={FLAGS.trials}, seed={seed},\n"
            f"      sampler_options={json.loads(FLAGS.tpe)!r},\n"
            f"      pruner_options={{'min_resource': {rung}, 'reduction_factor': 3}},\n"
            f"      fixed={{'train.eval_every': {rung}, 'train.checkpoint_every': {rung}}})\n")
  return search


def overrides(folder: str, steps: int) -> list[str]:
  changes = {"train.steps": steps, "train.batch_size": 16, "train.eval_batches": 8,
             "train.log_every": 10, "data.cache_dir": os.path.join(folder, "cache")}
  if FLAGS.quick:
    changes.update({"model.d_model": 64, "model.num_layers": 2, "model.d_ff": 256,
                    "data.seq_len": 64})
  return [f"--config.{k}={v}" for k, v in changes.items()]


def run_sweep(sweep: str, workdir: str, extra: list[str], *flags: str) -> None:
  proc = subprocess.run([sys.executable, "-m", "launch.sweep", "--config=experiments/clm_tiny.py",
                         f"--sweep={sweep}", f"--workdir={workdir}", *flags, "--", *extra],
                        cwd=ROOT, capture_output=True, text=True, timeout=6 * 3600)
  if proc.returncode == 2:  # bad input: launch.sweep's one line
    raise UserError(proc.stderr.strip().splitlines()[-1].removeprefix("error: "))
  if proc.returncode != 0:
    raise RuntimeError(f"launch.sweep failed: {proc.stderr[-2000:]}")


def spent(workdir: str) -> tuple[int, float]:
  """(training steps all trials ran, the best final held-out loss of a complete trial)."""
  steps, best = 0, float("inf")
  with open(os.path.join(workdir, "summary.csv")) as f:
    for row in csv.DictReader(f):
      metrics = os.path.join(workdir, row["trial"], "metrics.jsonl")
      records = [json.loads(x) for x in open(metrics) if x.strip()]
      steps += max((r["step"] for r in records), default=0)  # a pruned trial ends at an eval
      if row["status"] == "complete":
        best = min(best, float(row["final_eval_loss"]))
  return steps, best


def seed_spread(folder: str, extra: list[str], n: int) -> dict[str, list[float]]:
  """The grid's two best points, as JSON, -> their held-out losses under train.seed 0..n."""
  with open(os.path.join(folder, "grid", "summary.csv")) as f:
    rows = [r for r in csv.DictReader(f) if r["status"] == "complete"]
  out = {}
  for rank, row in enumerate(sorted(rows, key=lambda r: float(r["final_eval_loss"]))[:2]):
    point = json.loads(row["overrides"])
    sweep = os.path.join(folder, f"spread_{rank}.py")
    with open(sweep, "w") as f:
      f.write("from lmjax.sweep import Sweep\n\n\ndef get_sweep():\n"
              f"  return Sweep(grid={{'train.seed': {list(range(1, n + 1))!r}}}, "
              f"fixed={point!r})\n")
    workdir = os.path.join(folder, f"spread_{rank}")
    run_sweep(sweep, workdir, extra, f"--parallel={FLAGS.parallel}")
    with open(os.path.join(workdir, "summary.csv")) as f:
      by_seed = {json.loads(r["overrides"])["train.seed"]: float(r["final_eval_loss"])
                 for r in csv.DictReader(f)}
    out[json.dumps(point)] = [float(row["final_eval_loss"])] + [by_seed[s]
                                                               for s in range(1, n + 1)]
  return out


def report(grid: tuple[int, float], searches: dict[int, tuple[int, float]]) -> dict:
  """The figures and the two targets: the median search's gap and every search's share."""
  (grid_steps, grid_best), seeds = grid, sorted(searches)
  gaps = {s: searches[s][1] - grid_best for s in seeds}
  shares = {s: searches[s][0] / grid_steps for s in seeds}
  median_gap = statistics.median(gaps.values())
  print(f"  grid ({2 * FLAGS.grid_lrs} points): best held-out loss {grid_best:.4f}, "
        f"{grid_steps} training steps{' (an earlier run)' if FLAGS.grid_figures else ''}")
  for s in seeds:
    print(f"  TPE + ASHA ({FLAGS.trials} trials, seed {s}): best {searches[s][1]:.4f} "
          f"({gaps[s]:+.4f} nats), {searches[s][0]} steps ({shares[s]:.0%} of the grid's)")
  targets = [{"target": "median search within 0.01 nats of the grid's best",
              "gap": median_gap, "met": median_gap <= 0.01},
             {"target": "every search spends <= 50% of the grid's steps",
              "share": max(shares.values()), "met": max(shares.values()) <= 0.5}]
  for t in targets:
    print(f"  target {t['target']}: {'met' if t['met'] else 'NOT met'}")
  return {"grid": {"best": grid_best, "steps": grid_steps},
          "search": {str(s): {"best": searches[s][1], "steps": searches[s][0], "gap": gaps[s]}
                     for s in seeds},
          "targets": targets}


def grid_figures() -> tuple[int, float] | None:
  """--grid_figures as (steps, best), or None."""
  if not FLAGS.grid_figures:
    return None
  best, steps = FLAGS.grid_figures
  return int(steps), float(best)


def check_flags(steps: int) -> None:
  """Bad flags fail in one line before the grid's hour, not after it."""
  try:
    figures = grid_figures()
  except ValueError:
    raise UserError(f"--grid_figures takes BEST,STEPS, got {','.join(FLAGS.grid_figures)}"
                    ) from None
  if figures and FLAGS.seed_spread:
    raise UserError("--seed_spread retrains the grid's best points: it needs the grid, not "
                    "--grid_figures")
  try:
    json.loads(FLAGS.tpe)
  except ValueError as e:
    raise UserError(f"--tpe is not JSON ({e}): {FLAGS.tpe}") from None
  if FLAGS.warmup_step < 1 or (steps // 5) % FLAGS.warmup_step:
    raise UserError(f"--warmup_step {FLAGS.warmup_step} does not divide the longest warm-up, "
                    f"{steps // 5} (steps / 5)")
  try:  # the library's own check: a misspelt TPE option is refused here, not after the grid
    Search(space={"optimizer.warmup_steps": IntUniform(0, steps // 5, step=FLAGS.warmup_step)},
           sampler_options=json.loads(FLAGS.tpe)).check()
  except UserError as e:
    raise UserError(f"--tpe: {e}") from None


@cli_main
def main(argv: list[str]) -> None:
  del argv
  steps = 60 if FLAGS.quick and not FLAGS["steps"].present else FLAGS.steps
  seeds = [int(s) for s in FLAGS.seeds]
  check_flags(steps)
  with tempfile.TemporaryDirectory() as tmp:
    folder = FLAGS.workdir or tmp
    os.makedirs(folder, exist_ok=True)
    extra = overrides(folder, steps)
    if not FLAGS.grid_figures:
      run_sweep(grid_file(folder, steps), os.path.join(folder, "grid"), extra,
                f"--parallel={FLAGS.parallel}")
    searches = {}
    for seed in seeds:
      workdir = os.path.join(folder, f"search_{seed}")
      run_sweep(search_file(folder, steps, seed), workdir, extra, f"--workers={FLAGS.parallel}")
      searches[seed] = spent(workdir)
    grid = grid_figures() or spent(os.path.join(folder, "grid"))
    spread = seed_spread(folder, extra, FLAGS.seed_spread) if FLAGS.seed_spread else {}
  print(f"clm_tiny{' (quick: d64 x 2)' if FLAGS.quick else ''}, {steps} steps a trial")
  result = report(grid, searches)
  for point, losses in spread.items():
    print(f"  grid point {point}: held-out loss under train.seed 0..{len(losses) - 1}: "
          f"{' '.join(f'{x:.4f}' for x in losses)} (spread {max(losses) - min(losses):.4f})")
  result["seed_spread"] = spread
  if FLAGS.json:
    with open(FLAGS.json, "w") as f:
      json.dump(result, f, indent=2)


if __name__ == "__main__":
  app.run(main)
