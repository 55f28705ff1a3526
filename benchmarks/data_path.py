"""Tokens/s the input pipeline delivers (host batch + device transfer) against the train step.

  python -m benchmarks.data_path [--config experiments/clm_tiny.py] [--steps 20]

Prints both rates and their ratio in one run; the pipeline must be far faster
than the step it feeds.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
import time

import jax
from absl import app, flags
from ml_collections import config_flags

from launch.cli import cli_main
from lmjax import train as train_lib
from lmjax.experiment import experiment_from_dict
from lmjax.sharding import batch_sharding

FLAGS = flags.FLAGS


def data_rate(run, n: int) -> float:
  t = run.exp.train
  sharding = batch_sharding(run.mesh, run.exp.mesh.rules)
  start = time.perf_counter()
  for step in range(n):
    batch = run.train_data.batch(step, t.batch_size)
    arrays = [jax.make_array_from_process_local_data(sharding, v) for v in batch.values()]
  jax.block_until_ready(arrays)
  return n * t.batch_size * run.exp.data.seq_len / (time.perf_counter() - start)


def step_rate(exp, steps: int) -> float:
  """The train loop's own tokens/s over `steps` steps after the compiled first one."""
  train = dataclasses.replace(exp.train, steps=steps + 1, log_every=steps + 1, eval_every=0,
                              eval_batches=1, checkpoint_every=10**9)
  with tempfile.TemporaryDirectory() as workdir:
    train_lib.train_and_evaluate(dataclasses.replace(exp, train=train), workdir)
    records = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
  return [r for r in records if r["split"] == "train"][-1]["tokens_per_s"]


@cli_main
def main(argv):
  del argv
  data, step = measure(experiment_from_dict(FLAGS.config.to_dict()), FLAGS.batches, FLAGS.steps)
  print(f"data path  {data:12,.0f} tokens/s")
  print(f"train step {step:12,.0f} tokens/s (compiled, steady state)")
  print(f"ratio      {data / step:12.1f}x")


def measure(exp, batches: int, steps: int) -> tuple[float, float]:
  """(input pipeline tokens/s, train step tokens/s) for one experiment."""
  with tempfile.TemporaryDirectory() as workdir:
    run = train_lib.setup_run(exp, workdir)
    data = data_rate(run, batches)
    run.ckpt.close()
    run.writer.close()
  return data, step_rate(exp, steps)


if __name__ == "__main__":
  config_flags.DEFINE_config_file("config", "experiments/clm_tiny.py", "experiment file")
  flags.DEFINE_integer("steps", 20, "train steps timed")
  flags.DEFINE_integer("batches", 200, "host batches timed")
  app.run(main)
