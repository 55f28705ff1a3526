"""Tokens/s the input pipeline delivers (host batch + device transfer) against the train step.

  python -m benchmarks.data_path [--config experiments/clm_tiny.py] [--steps 20] [--bucket]

Prints both rates and their ratio in one run; the pipeline must be far faster
than the step it feeds. `--bucket` adds the object-store row: the store reader's
tokens/s from a local S3 server (moto) vs local disk, and the time of a checkpoint
save and restore of the experiment's state to S3 vs disk.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import tempfile
import time
from typing import Iterator

import jax
from absl import app, flags
from ml_collections import config_flags

from launch.cli import cli_main
from lmjax import paths
from lmjax import train as train_lib
from lmjax.data import store
from lmjax.data.batches import PackedDataset
from lmjax.data.pipeline import delimiters
from lmjax.data.prepare import PrepareConfig, prepare
from lmjax.data.tokenizer_io import load_tokenizer
from lmjax.errors import UserError
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


@contextlib.contextmanager
def local_s3(bucket: str = "lmjax-bench") -> Iterator[str]:
  """A moto S3 server on 127.0.0.1 with one bucket; the environment points s3fs, boto3 and
  TensorStore at it while the block runs. Yields "s3://BUCKET"."""
  try:
    from moto.server import ThreadedMotoServer
  except ImportError:
    raise UserError('the S3 row needs a local S3 server: pip install -e ".[bench]"') from None
  server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
  server.start()
  host, port = server.get_host_and_port()
  env = {"AWS_ENDPOINT_URL": f"http://{host}:{port}", "AWS_ACCESS_KEY_ID": "test",
         "AWS_SECRET_ACCESS_KEY": "test", "AWS_REGION": "us-east-1",
         "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}
  saved = {k: os.environ.get(k) for k in env}
  os.environ.update(env)
  try:
    fs, _ = paths.filesystem(f"s3://{bucket}")
    fs.mkdir(bucket)
    yield f"s3://{bucket}"
  finally:
    for key, value in saved.items():
      os.environ.pop(key, None) if value is None else os.environ.__setitem__(key, value)
    server.stop()


def reader_rate(path: str, seq_len: int, batch: int, batches: int) -> float:
  """Tokens/s of packed batches read from the store at `path` (host side only)."""
  opened = store.TokenStore.open(path)
  data = PackedDataset(store.TokenSource(opened.shards), seq_len, seed=0)
  start = time.perf_counter()
  for step in range(batches):
    data.batch(step, batch)
  return batches * batch * seq_len / (time.perf_counter() - start)


def checkpoint_seconds(exp, workdir: str, repeats: int = 3) -> tuple[float, float]:
  """(save, restore) seconds of the experiment's fresh train state, min of `repeats`."""
  run = train_lib.build_run(exp, workdir)
  state = jax.jit(lambda: train_lib.unbox(train_lib.init_state(
      run.fns, 0, (1, exp.data.seq_len))))()
  abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding),
                          state)
  save, restore = [], []
  for step in range(1, repeats + 1):
    start = time.perf_counter()
    run.ckpt.save(step, state, {})
    run.ckpt.wait()
    save.append(time.perf_counter() - start)
    start = time.perf_counter()
    jax.block_until_ready(run.ckpt.restore(step, abstract)[0])
    restore.append(time.perf_counter() - start)
  run.ckpt.close()
  run.writer.close()
  return min(save), min(restore)


def bucket_row(exp, batches: int) -> dict[str, float]:
  """The object-store row: reader tokens/s and checkpoint seconds, S3 (local moto) vs disk."""
  d = exp.data
  begin, end = delimiters(load_tokenizer(d.tokenizer), exp.objective.kind)
  out: dict[str, float] = {}
  with local_s3() as bucket, tempfile.TemporaryDirectory() as tmp:
    for where, root in (("disk", tmp), ("s3", bucket)):
      target = paths.join(root, "store")
      prepare(PrepareConfig(inputs=tuple(d.train_files), output=target, tokenizer=d.tokenizer,
                            begin=begin, end=end, workers=1, split_mb=0.25), show_progress=False)
      paths.CACHE = paths.BlockCache(paths.CACHE.max_bytes)  # cold: every block fetched once
      out[f"reader_{where}_tokens_per_s"] = reader_rate(target, d.seq_len,
                                                        exp.train.batch_size, batches)
      save, restore = checkpoint_seconds(exp, paths.join(root, "run"))
      out[f"save_{where}_s"], out[f"restore_{where}_s"] = save, restore
  return out


def print_bucket_row(row: dict[str, float]) -> None:
  print(f"reader     disk {row['reader_disk_tokens_per_s']:12,.0f} tokens/s | local S3 "
        f"{row['reader_s3_tokens_per_s']:12,.0f} tokens/s | S3/disk "
        f"{row['reader_s3_tokens_per_s'] / row['reader_disk_tokens_per_s']:.2f}x")
  for what in ("save", "restore"):
    disk, s3 = row[f"{what}_disk_s"], row[f"{what}_s3_s"]
    print(f"checkpoint {what:7s} disk {disk * 1e3:8.0f} ms | local S3 {s3 * 1e3:8.0f} ms | "
          f"S3/disk {s3 / disk:.2f}x")


@cli_main
def main(argv):
  del argv
  exp = experiment_from_dict(FLAGS.config.to_dict())
  data, step = measure(exp, FLAGS.batches, FLAGS.steps)
  print(f"data path  {data:12,.0f} tokens/s")
  print(f"train step {step:12,.0f} tokens/s (compiled, steady state)")
  print(f"ratio      {data / step:12.1f}x")
  if FLAGS.bucket:
    print_bucket_row(bucket_row(exp, FLAGS.batches))


def measure(exp, batches: int, steps: int) -> tuple[float, float]:
  """(input pipeline tokens/s, train step tokens/s) for one experiment."""
  with tempfile.TemporaryDirectory() as workdir:
    run = train_lib.build_run(exp, workdir)
    data = data_rate(run, batches)
    run.ckpt.close()
    run.writer.close()
  return data, step_rate(exp, steps)


if __name__ == "__main__":
  config_flags.DEFINE_config_file("config", "experiments/clm_tiny.py", "experiment file")
  flags.DEFINE_integer("steps", 20, "train steps timed")
  flags.DEFINE_integer("batches", 200, "host batches timed")
  flags.DEFINE_bool("bucket", False, "add the S3 (local moto server) vs disk row")
  app.run(main)
