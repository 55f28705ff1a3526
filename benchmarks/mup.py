"""Learning-rate transfer across widths: SP against µP, on the bundled corpus.

  python -m benchmarks.mup [--quick] [--json F] [--widths 64,128,256,512]
      [--lrs 0.0009765625,...] [--steps 600] [--plot docs/mup_transfer.png]
  (default grid: 2^-10 .. 2^-5)

For every parametrization and width, clm_tiny's architecture at that width (4 heads,
d_ff = 4 x width, µP's base width = the smallest) trains on the same tokens (fixed
batch, sequence length and steps: a fixed token budget) at every learning rate of the
grid; the held-out loss at the end ranks them. Reported: the best learning rate per width
(target: under µP the same grid point wins at every width), and at each width the loss
at the learning rate that won at the base width against the loss at the width's own
best. `--json F` writes {"sp": {"<width>": lr, ...}, "mup": {...}} under "best_lr", the
whole loss table under "loss".

600 steps by default: at 200 the loss is still escaping its first plateau and a single
run's curve against the learning rate is jagged (0.1-0.2 nats between neighbouring grid
points, the same jag at every width), so the winner is a coin toss (docs/scaling.md).
"""

from __future__ import annotations

import json
import math
import os
import tempfile

from absl import app, flags, logging

from launch.cli import cli_main

flags.DEFINE_bool("quick", False, "widths 64-256, 6 learning rates, 60 steps: minutes")
flags.DEFINE_list("widths", ["64", "128", "256"], "d_model values; the first is µP's base")
flags.DEFINE_list("lrs", [str(2.0 ** -k) for k in range(10, 4, -1)], "learning-rate grid")
flags.DEFINE_integer("steps", 600, "training steps per run (the token budget)")
flags.DEFINE_integer("layers", 2, "layers of every model")
flags.DEFINE_string("json", "", "write the figures here")
flags.DEFINE_string("plot", "", "write loss-against-learning-rate curves here (PNG)")
FLAGS = flags.FLAGS


def config(width: int, base: int, parametrization: str, lr: float, steps: int,
           cache: str) -> dict:
  from experiments import clm_tiny
  c = clm_tiny.get_config()
  c.model.update(d_model=width, num_heads=4, d_ff=4 * width, num_layers=FLAGS.layers,
                 parametrization=parametrization, mup_base_d_model=base, dtype="float32")
  c.data.update(seq_len=64, cache_dir=cache)
  c.optimizer.update(learning_rate=lr, warmup_steps=max(steps // 10, 1))
  c.train.update(steps=steps, batch_size=16, eval_every=0, eval_batches=8, log_every=steps,
                 checkpoint_every=steps, async_checkpoints=False)
  return c.to_dict()


def final_loss(cfg: dict, workdir: str) -> float:
  from lmjax import train as train_lib
  from lmjax.experiment import experiment_from_dict
  metrics = train_lib.train_and_evaluate(experiment_from_dict(cfg), workdir)
  loss = float(metrics["loss"])
  return loss if math.isfinite(loss) else float("inf")


def sweep(widths: list[int], lrs: list[float], steps: int) -> dict[str, dict[int, dict]]:
  """{parametrization: {width: {lr: held-out loss}}}."""
  out: dict[str, dict[int, dict]] = {"sp": {}, "mup": {}}
  with tempfile.TemporaryDirectory() as tmp:
    cache = os.path.join(tmp, "cache")
    for param in out:
      for width in widths:
        out[param][width] = {}
        for k, lr in enumerate(lrs):
          run = os.path.join(tmp, f"{param}_{width}_{k}")
          out[param][width][lr] = final_loss(config(width, widths[0], param, lr, steps, cache),
                                             run)
          logging.info("%s width %d lr %.3g: %.4f", param, width, lr, out[param][width][lr])
  return out


def report(loss: dict[str, dict[int, dict]], widths: list[int], lrs: list[float]) -> dict:
  best = {p: {w: min(loss[p][w], key=loss[p][w].get) for w in widths} for p in loss}
  print(f"held-out loss after {FLAGS.steps} steps (batch 16 x 64 tokens), {FLAGS.layers} layers")
  for p in loss:
    print(f"  {p}: " + "  ".join(f"width {w}: best lr {best[p][w]:.3g}" for w in widths))
    base_lr = best[p][widths[0]]
    for w in widths:
      gap = loss[p][w][base_lr] - loss[p][w][best[p][w]]
      print(f"    width {w:5d}: loss at the base width's best lr {loss[p][w][base_lr]:.4f}, "
            f"at its own best {loss[p][w][best[p][w]]:.4f} (+{gap:.4f})")
  same = len({best["mup"][w] for w in widths}) == 1
  print(f"  target: under µP the same grid point wins at every width: {'met' if same else 'NOT met'}"
        f" (SP: {len({best['sp'][w] for w in widths})} different winners)")
  return {"best_lr": {p: {str(w): lr for w, lr in best[p].items()} for p in best},
          "loss": {p: {str(w): {str(lr): v for lr, v in loss[p][w].items()} for w in widths}
                   for p in loss},
          "transfer_gap": {p: {str(w): loss[p][w][best[p][widths[0]]] - loss[p][w][best[p][w]]
                               for w in widths} for p in loss},
          "targets": [{"target": "µP: one best learning rate at every width", "met": same}]}


def plot(loss: dict, widths: list[int], lrs: list[float], path: str) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
  for ax, p in zip(axes, ("sp", "mup")):
    for w in widths:
      ys = [min(loss[p][w][lr], 10.0) for lr in lrs]
      ax.plot(lrs, ys, marker="o", label=f"width {w}")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("learning rate")
    ax.set_title("SP" if p == "sp" else f"µP (base width {widths[0]})")
    ax.legend(fontsize=8)
  axes[0].set_ylabel(f"held-out loss after {FLAGS.steps} steps")
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


@cli_main
def main(argv: list[str]) -> None:
  del argv
  if FLAGS.quick:
    FLAGS.widths, FLAGS.steps = ["64", "128", "256"], 60
    FLAGS.lrs = [str(2.0 ** -k) for k in range(11, 5, -1)]
  widths, lrs = [int(w) for w in FLAGS.widths], sorted(float(x) for x in FLAGS.lrs)
  loss = sweep(widths, lrs, FLAGS.steps)
  result = report(loss, widths, lrs)
  if FLAGS.plot:
    plot(loss, widths, lrs, FLAGS.plot)
  if FLAGS.json:
    with open(FLAGS.json, "w") as f:
      json.dump(result, f, indent=2)


if __name__ == "__main__":
  app.run(main)
