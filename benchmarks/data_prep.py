"""Preparing corpora and reading token stores: throughput, scaling, memory.

  python -m benchmarks.data_prep [--sizes_mb 200,2000] [--json OUT] [--workdir DIR]

Measured in one run, on JSON-lines corpora made from the bundled Shakespeare:
  - prepare tokens/s with 1 and 2 local workers (target: 2 workers >= 1.7x one);
  - the Ray engine against the local one on this machine, and that both write
    identical stores;
  - the peak resident memory of any worker at each corpus size (target: the
    largest over the smallest <= 1.2, each under 1 GiB);
  - the reader's batch time and resident memory on a real store of ~10^5 windows
    against an index of 10^10 simulated windows (target: no growth beyond noise,
    under 200 MB), each in a fresh process.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np
from absl import app, flags

from lmjax.data.corpus import BUNDLED_DIR
from lmjax.data.prepare import PrepareConfig, prepare

flags.DEFINE_list("sizes_mb", ["200", "2000"], "corpus sizes; throughput uses the first")
flags.DEFINE_string("json", "", "write every figure to this JSON file")
flags.DEFINE_string("workdir", "", "where corpora and stores go (default: a temporary folder)")
flags.DEFINE_bool("ray", True, "include the Ray engine")
flags.DEFINE_string("probe", "", "internal: measure the reader on 'store:PATH' or 'simulated'")
FLAGS = flags.FLAGS
TOKENIZER = os.path.join(BUNDLED_DIR, "tokenizer.model")
SEQ, BATCH = 128, 64


class SyntheticShard:
  """A shard computed on demand: token i is i % 50000, a document starts every 100 tokens.
  Stands in for corpora too large to write, to show the reader's cost per window."""

  def __init__(self, num_tokens: int):
    self.num_tokens = num_tokens

  def tokens(self, lo: int, hi: int) -> np.ndarray:
    return np.arange(lo, hi) % 50000

  def starts_in(self, lo: int, hi: int) -> np.ndarray:
    return np.arange(-(-lo // 100) * 100, hi, 100)


def make_corpus(folder: str, megabytes: int) -> list[str]:
  """JSON lines of Shakespeare's documents, numbered, in files of 25 MB."""
  text = open(os.path.join(BUNDLED_DIR, "train.txt")).read()
  docs = [d for d in text.split("\n\n") if d.strip()]
  os.makedirs(folder, exist_ok=True)
  paths, written, i = [], 0, 0
  while written < megabytes << 20:
    path = os.path.join(folder, f"part-{len(paths):05d}.jsonl")
    with open(path, "w") as f:
      size = 0
      while size < 25 << 20 and written + size < megabytes << 20:
        line = json.dumps({"id": i, "text": f"{i}. {docs[i % len(docs)]}"}) + "\n"
        f.write(line)
        size, i = size + len(line), i + 1
    paths.append(path)
    written += size
  return paths


def run_cli(inputs: list[str], output: str, workers: int) -> dict:
  """`launch.prepare_data` as a user runs it (a fresh process, so workers fork from a small
  parent): its tokens/s, seconds and peak worker memory."""
  shutil.rmtree(output, ignore_errors=True)
  proc = subprocess.run([sys.executable, "-m", "launch.prepare_data",
                         *[f"--input={p}" for p in inputs], f"--tokenizer={TOKENIZER}",
                         f"--output={output}", f"--workers={workers}"],
                        capture_output=True, text=True, timeout=3600, check=True)
  found = re.search(r"([\d,]+) tokens, .* in ([\d.]+)s, ([\d,]+) tokens/s; peak worker memory "
                    r"([\d,]+) MiB", proc.stdout)
  tokens, seconds, rate, rss = (float(g.replace(",", "")) for g in found.groups())
  return {"tokens": int(tokens), "seconds": seconds, "tokens_per_s": rate, "peak_rss_mb": rss}


def run_ray(inputs: list[str], output: str, workers: int) -> dict:
  """The Ray engine on a Ray started here first (its start timed apart)."""
  import ray
  shutil.rmtree(output, ignore_errors=True)
  start = time.perf_counter()
  ray.init(num_cpus=workers, include_dashboard=False, log_to_driver=False)
  started = time.perf_counter() - start
  try:
    s = prepare(PrepareConfig(inputs=tuple(inputs), output=output, tokenizer=TOKENIZER, begin=2,
                              end=3, workers=workers, engine="ray"), show_progress=False)
  finally:
    ray.shutdown()
  return {"tokens_per_s": s.tokens_per_s, "seconds": s.seconds, "ray_start_seconds": started}


def store_digest(folder: str) -> str:
  digest = hashlib.sha256()
  for d, _, files in sorted(os.walk(folder)):
    for name in sorted(files):
      digest.update(name.encode())
      with open(os.path.join(d, name), "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
          digest.update(block)
  return digest.hexdigest()


def probe(spec: str) -> dict:
  """Batch time and resident memory of the reader (run in a fresh process)."""
  from lmjax.data import PackedDataset, TokenSource, TokenStore
  if spec == "simulated":
    source = TokenSource([SyntheticShard(SEQ * 10**8)] * 100)  # 10^10 windows
  else:
    shards, total = [], 0
    for shard in TokenStore.open(spec.split(":", 1)[1]).shards:  # the first ~10^5 windows
      shards.append(shard)
      total += shard.num_tokens
      if total >= SEQ * 10**5:
        break
    source = TokenSource(shards)
  data = PackedDataset(source, SEQ, seed=0)
  steps = np.random.default_rng(0).integers(0, data.num_windows // BATCH, 300)
  for step in steps[:50]:
    data.batch(int(step), BATCH)
  start = time.perf_counter()
  for step in steps[50:]:
    data.batch(int(step), BATCH)
  seconds = (time.perf_counter() - start) / (len(steps) - 50)
  rss = int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
  return {"windows": data.num_windows, "batch_ms": seconds * 1e3, "rss_mb": rss / 2**20}


def run_probe(spec: str) -> dict:
  proc = subprocess.run([sys.executable, "-m", "benchmarks.data_prep", f"--probe={spec}"],
                        capture_output=True, text=True, timeout=600, check=True)
  return json.loads(proc.stdout.strip().splitlines()[-1])


def measure(workdir: str, sizes_mb: list[int], with_ray: bool) -> dict:
  out: dict = {}
  corpora = {mb: make_corpus(os.path.join(workdir, f"corpus{mb}"), mb) for mb in sizes_mb}
  small = corpora[sizes_mb[0]]
  for workers in (1, 2):
    out[f"local_{workers}_workers"] = r = run_cli(small, os.path.join(workdir, f"w{workers}"),
                                                  workers)
    print(f"local, {workers} worker(s), {sizes_mb[0]} MB: {r['tokens_per_s']:12,.0f} tokens/s "
          f"({r['tokens']:,} tokens in {r['seconds']:.1f}s)", flush=True)
  digests = {k: store_digest(os.path.join(workdir, k)) for k in ("w1", "w2")}
  if with_ray:
    out["ray_2_workers"] = r = run_ray(small, os.path.join(workdir, "ray"), 2)
    digests["ray"] = store_digest(os.path.join(workdir, "ray"))
    print(f"ray,   2 workers,   {sizes_mb[0]} MB: {r['tokens_per_s']:12,.0f} tokens/s "
          f"({r['seconds']:.1f}s, after {r['ray_start_seconds']:.1f}s to start Ray)", flush=True)
  out["stores_identical"] = len(set(digests.values())) == 1
  for mb, files in corpora.items():
    r = out["local_2_workers"] if mb == sizes_mb[0] else run_cli(
        files, os.path.join(workdir, f"store{mb}"), 2)
    out[f"peak_worker_rss_mb_{mb}"] = r["peak_rss_mb"]
    print(f"peak worker memory, {mb} MB corpus ({r['tokens']:,} tokens): "
          f"{r['peak_rss_mb']:,.0f} MiB", flush=True)
  out["reader_store"] = run_probe(f"store:{os.path.join(workdir, 'w2')}")
  out["reader_simulated"] = run_probe("simulated")
  for key in ("reader_store", "reader_simulated"):
    r = out[key]
    print(f"reader, {r['windows']:.1e} windows: {r['batch_ms']:.2f} ms per {BATCH}x{SEQ} "
          f"batch, {r['rss_mb']:.0f} MB resident", flush=True)
  return out


def targets(out: dict, sizes_mb: list[int]) -> list[tuple[str, bool]]:
  speedup = out["local_2_workers"]["tokens_per_s"] / out["local_1_workers"]["tokens_per_s"]
  rss = [out[f"peak_worker_rss_mb_{mb}"] for mb in sizes_mb]
  store, sim = out["reader_store"], out["reader_simulated"]
  return [
      (f"2 workers / 1 worker = {speedup:.2f}x (>= 1.7x)", speedup >= 1.7),
      (f"local, 1 and 2 workers{' and Ray' if 'ray_2_workers' in out else ''} wrote identical "
       "stores", out["stores_identical"]),
      (f"worker memory {max(rss) / min(rss):.2f}x from {sizes_mb[0]} to {sizes_mb[-1]} MB "
       f"(<= 1.2x), max {max(rss):.0f} MiB (< 1024)", max(rss) / min(rss) <= 1.2 and max(rss) < 1024),
      (f"reader at 10^10 windows: {sim['batch_ms'] / store['batch_ms']:.2f}x the batch time, "
       f"{sim['rss_mb'] - store['rss_mb']:+.0f} MB vs 10^5 (no growth), "
       f"{max(sim['rss_mb'], store['rss_mb']):.0f} MB (< 200)",
       sim["batch_ms"] <= 1.3 * store["batch_ms"] and sim["rss_mb"] <= store["rss_mb"] + 20 and
       max(sim["rss_mb"], store["rss_mb"]) < 200),
  ]


def main(argv):
  del argv
  if FLAGS.probe:
    print(json.dumps(probe(FLAGS.probe)))
    return
  sizes = [int(s) for s in FLAGS.sizes_mb]
  workdir = FLAGS.workdir or tempfile.mkdtemp(prefix="lmjax-data-prep-")
  try:
    start = time.perf_counter()
    out = measure(workdir, sizes, FLAGS.ray)
    out["seconds"] = time.perf_counter() - start
    if "ray_2_workers" in out:
      ratio = out["ray_2_workers"]["tokens_per_s"] / out["local_2_workers"]["tokens_per_s"]
      print(f"ray / local at 2 workers: {ratio:.2f}x")
    print("\ntargets")
    for line, ok in targets(out, sizes):
      print(f"  [{'met' if ok else 'MISSED'}] {line}")
    if FLAGS.json:
      with open(FLAGS.json, "w") as f:
        json.dump(out, f, indent=1)
  finally:
    if not FLAGS.workdir:
      shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
  app.run(main)
