"""Corpora into token stores, once, on every core of a machine or every machine of a Ray cluster.

Preparation has two passes, both parallel: `inspect` hashes each input and cuts
it into parts (`readers.plan_parts`); `write_shard` tokenizes one part into one
shard, streaming (a chunk of documents at a time, so a worker's memory is flat
in the corpus size). A shard is named by the hash of what determines its bytes
(input sha256, part, tokenizer, delimiters, reader settings), written under
temporary names and renamed, its record last: a rerun reuses every shard whose
record and checksums hold, so a crash loses nothing and new inputs cost only
their own shards. `index.json` is written last of all, in input order, with no
time, engine or worker count in it: local and Ray runs write identical bytes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import itertools
import json
import os
import socket
import sys
import tempfile
import time
from typing import Any, Callable, Iterator, Sequence

import numpy as np
from absl import logging

from lmjax import paths
from lmjax.data import readers, store
from lmjax.data.special import file_sha256
from lmjax.errors import UserError
from lmjax.process import alive as _alive
from lmjax.process import die_with_parent as _die_with_parent

_CHUNK_BYTES = 4 << 20  # text per tokenizer call: bounds a worker's memory
_CHUNK_DOCS = 4096
Progress = Callable[[int, int], None]  # (input bytes done, tokens written) increments


@dataclasses.dataclass(frozen=True)
class PrepareConfig:
  inputs: tuple[str, ...]  # files, directories or globs
  output: str  # the store directory
  tokenizer: str  # SentencePiece model, or a Hugging Face tokenizer.json / model directory
  begin: int  # id framing each document: bos (CLM) or [CLS] (MLM)
  end: int  # eos (CLM) or [SEP] (MLM)
  text_field: str = "text"  # JSON field / parquet column holding the text
  bad_utf8: str = "fail"  # "fail" with the line, or "skip" and count
  split_mb: float = 64  # uncompressed text and parquet are cut into parts of about this size
  workers: int = 0  # processes (local) or concurrent tasks (ray); 0: every core
  engine: str = "local"  # "local" process pool or "ray" tasks
  ray_address: str = ""  # "auto" joins a running cluster; "" starts a local Ray


@dataclasses.dataclass(frozen=True)
class Settings:
  """What every shard's bytes depend on besides its input: sent to each worker."""

  tokenizer_kind: str  # "sentencepiece" or "huggingface"
  tokenizer_data: bytes  # the model, as `tokenizer.encoder` rebuilds it
  tokenizer_sha256: str
  vocab_size: int
  begin: int
  end: int
  text_field: str
  bad_utf8: str
  num_threads: int = 1  # SentencePiece threads per worker

  def key(self) -> str:
    return (f"{store.FORMAT}:{store.VERSION}:{self.tokenizer_sha256}:{self.begin}:{self.end}:"
            f"{self.text_field}:{self.bad_utf8}")


# ----------------------------------------------------------------------------- workers


def inspect(path: str, split_bytes: int) -> dict[str, Any]:
  """An input's size, sha256 and parts."""
  parts = readers.plan_parts(path, split_bytes)
  return {"path": path, "size": os.path.getsize(path), "sha256": file_sha256(path),
          "parts": [[p.lo, p.hi] for p in parts]}


def shard_name(settings: Settings, input_sha256: str, part: Sequence[int]) -> str:
  key = f"{settings.key()}:{input_sha256}:{part[0]}:{part[1]}"
  return hashlib.sha256(key.encode()).hexdigest()[:24]


@functools.lru_cache(maxsize=2)
def _encoder(kind: str, data: bytes, num_threads: int) -> Callable[[list[str]], list[list[int]]]:
  from lmjax.data.tokenizer_io import encoder
  return encoder(kind, data, num_threads)


def _chunks(docs: Iterator[str]) -> Iterator[list[str]]:
  chunk: list[str] = []
  size = 0
  for doc in docs:
    chunk.append(doc)
    size += len(doc)
    if size >= _CHUNK_BYTES or len(chunk) >= _CHUNK_DOCS:
      yield chunk
      chunk, size = [], 0
  if chunk:
    yield chunk


def _complete(folder: str, name: str, itemsize: int) -> dict[str, Any] | None:
  """The shard's record if the shard is complete and its checksums hold (in a bucket: its
  sizes, which cost no download; objects are written whole, the record last)."""
  try:
    record = json.loads(paths.read_bytes(paths.join(folder, f"{name}.json")))
    if paths.is_remote(folder):
      sizes = {"tokens": record["tokens"] * itemsize, "docs": record["docs"] * 8}
      ok = all(paths.getsize(paths.join(folder, f"{name}.{k}")) == sizes[k] for k in sizes)
    else:
      ok = all(file_sha256(os.path.join(folder, f"{name}.{k}")) == record[f"{k}_sha256"]
               for k in ("tokens", "docs"))
  except (OSError, ValueError, KeyError):
    return None
  return record if ok else None


def write_shard(output: str, settings: Settings, job: dict[str, Any],
                progress: Progress | None = None) -> dict[str, Any]:
  """Tokenizes one part into one shard (or finds it complete); returns its record and the
  worker's peak resident memory."""
  folder = paths.join(output, store.SHARDS)
  name, part = job["name"], readers.Part(job["path"], *job["part"])
  record = _complete(folder, name, store.token_dtype(settings.vocab_size).itemsize)
  reported = [0]

  def report(text_bytes: int, tokens: int) -> None:  # text read, capped at the part's size
    step = max(0, min(text_bytes, job["bytes"] - reported[0]))
    reported[0] += step
    if progress:
      progress(step, tokens)

  reused = record is not None
  if reused:
    report(0, record["tokens"])
  else:
    record = _tokenize_part(folder, name, part, settings, report)
  if progress:
    progress(job["bytes"] - reported[0], 0)
  return {"record": record, "reused": reused, "peak_rss_mb": _peak_rss_mb()}


def _tokenize_part(folder: str, name: str, part: readers.Part, settings: Settings,
                   progress: Progress) -> dict[str, Any]:
  encode = _encoder(settings.tokenizer_kind, settings.tokenizer_data, settings.num_threads)
  dtype = store.token_dtype(settings.vocab_size)
  # Written locally first: in place for a local store, in the temp dir for a bucket's
  # (then uploaded whole), so a worker's memory stays flat either way.
  local = tempfile.gettempdir() if paths.is_remote(folder) else folder
  tag = paths.tmp_tag()
  tmp = {k: os.path.join(local, f".{name}.{k}.{tag}") for k in ("tokens", "docs", "json")}
  digests = {k: hashlib.sha256() for k in ("tokens", "docs")}
  offset = docs = 0
  skipped = readers.ReadStats()
  try:
    with open(tmp["tokens"], "wb") as tok_f, open(tmp["docs"], "wb") as doc_f:
      for chunk in _chunks(readers.read_documents(part, settings.bad_utf8, settings.text_field,
                                                  skipped)):
        ids = encode(chunk)
        flat, lengths = _framed(ids, settings.begin, settings.end, dtype)
        starts = (offset + np.cumsum(lengths) - lengths).astype("<i8")
        for f, key, data in ((tok_f, "tokens", flat.tobytes()), (doc_f, "docs", starts.tobytes())):
          f.write(data)
          digests[key].update(data)
        offset, docs = offset + int(lengths.sum()), docs + len(ids)
        progress(sum(len(d) for d in chunk), int(lengths.sum()))
    if docs == 0 and part.hi < 0:
      raise UserError(f"{part.path}: no documents (every record is empty or blank)")
    record = {"name": name, "tokens": offset, "docs": docs, "blank_docs": skipped.blank_docs,
              "tokens_sha256": digests["tokens"].hexdigest(),
              "docs_sha256": digests["docs"].hexdigest()}
    with open(tmp["json"], "w") as f:
      json.dump(record, f, sort_keys=True)
    for key in ("tokens", "docs", "json"):  # the record last: it marks the shard complete
      paths.put_file(tmp[key], paths.join(folder, f"{name}.{key}"))
    return record
  finally:
    for path in tmp.values():
      if os.path.exists(path):
        os.remove(path)


def _host() -> str:
  return socket.gethostname().replace(".", "_")


def _remove_stale(folder: str) -> None:
  """Deletes temporary files of writers that died (this host) or stalled for a day (a
  bucket has none: its objects arrive whole)."""
  if paths.is_remote(folder):
    return
  host = _host()
  for name in os.listdir(folder):
    tag = name.rpartition(".")[2]
    if not tag.startswith("tmp-"):
      continue
    writer_host, _, pid = tag[4:].rpartition("-")
    path = os.path.join(folder, name)
    try:
      dead = writer_host == host and pid.isdigit() and not _alive(int(pid))
      if dead or time.time() - os.path.getmtime(path) > 86400:
        os.remove(path)
    except OSError:
      pass


def _framed(ids: list[list[int]], begin: int, end: int, dtype: np.dtype
            ) -> tuple[np.ndarray, np.ndarray]:
  """[begin] ids [end] of each document back to back, and each framed length."""
  lengths = np.fromiter(map(len, ids), np.int64, len(ids)) + 2
  ends = np.cumsum(lengths)  # one past each document's end token
  flat = np.empty(int(ends[-1]) if len(ids) else 0, dtype)
  body = np.ones(flat.size, bool)
  body[ends - lengths] = body[ends - 1] = False
  flat[~body] = np.stack([np.full(len(ids), begin), np.full(len(ids), end)], 1).ravel()
  flat[body] = np.fromiter(itertools.chain.from_iterable(ids), dtype, flat.size - 2 * len(ids))
  return flat, lengths


def _peak_rss_mb() -> float:
  import resource
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


# ----------------------------------------------------------------------------- engines


_QUEUE = None


def _worker_init(queue) -> None:
  global _QUEUE
  _QUEUE = queue
  _die_with_parent()


def _report(done: int, tokens: int) -> None:
  _QUEUE.put_nowait((done, tokens))


def _local_write_shard(output: str, settings: Settings, job: dict[str, Any]) -> dict[str, Any]:
  return write_shard(output, settings, job, _report)


def _run_local(tasks: list[tuple[Callable, tuple]], workers: int,
               on_progress: Progress | None) -> list[Any]:
  """Runs `fn(*args)` for each task: in this process for one worker, else a process pool."""
  if workers <= 1 or len(tasks) <= 1:
    out = []
    for fn, args in tasks:
      if fn is _local_write_shard:
        fn, args = write_shard, (*args, on_progress)
      out.append(fn(*args))
    return out
  import concurrent.futures
  import multiprocessing as mp
  import queue as queue_lib
  # Fork starts fast and needs no importable __main__, but never fork JAX's threads.
  ctx = mp.get_context("spawn" if "jax" in sys.modules else "fork")
  queue = ctx.Queue()
  with concurrent.futures.ProcessPoolExecutor(min(workers, len(tasks)), mp_context=ctx,
                                              initializer=_worker_init,
                                              initargs=(queue,)) as pool:
    futures = [pool.submit(fn, *args) for fn, args in tasks]
    try:
      pending = set(futures)
      while pending:
        _, pending = concurrent.futures.wait(pending, timeout=0.5)
        while True:
          try:
            update = queue.get_nowait()
          except queue_lib.Empty:
            break
          if on_progress:
            on_progress(*update)
      return [f.result() for f in futures]
    except BaseException:
      for f in futures:
        f.cancel()
      raise


@contextlib.contextmanager
def _engine(cfg: PrepareConfig, workers: int) -> Iterator[Callable[..., list[Any]]]:
  """`run(tasks, workers, on_progress)` for the configured engine; Ray starts once."""
  if cfg.engine == "local":
    yield _run_local
    return
  try:
    import ray
  except ImportError:
    raise UserError("--engine ray needs Ray: pip install -e '.[ray]'") from None
  started = not ray.is_initialized()
  if started:
    kwargs = {"address": cfg.ray_address} if cfg.ray_address else {"num_cpus": workers}
    ray.init(include_dashboard=False, log_to_driver=False, **kwargs)
  try:
    yield _run_ray
  finally:
    if started:
      ray.shutdown()


def _run_ray(tasks: list[tuple[Callable, tuple]], workers: int,
             on_progress: Progress | None) -> list[Any]:
  """The same tasks as Ray tasks (one CPU each, as many at once as the cluster has CPUs),
  results in task order; progress as each one finishes."""
  import ray
  del workers  # Ray schedules by the CPUs it was started with
  remote = ray.remote(num_cpus=1)(_call)
  refs = [remote.remote(fn, *args) for fn, args in tasks]
  position = {ref: i for i, ref in enumerate(refs)}
  out: list[Any] = [None] * len(refs)
  pending = list(refs)
  try:
    while pending:
      ready, pending = ray.wait(pending, num_returns=1, timeout=None)
      for ref in ready:
        i = position[ref]
        try:
          out[i] = ray.get(ref)
        except ray.exceptions.RayTaskError as e:
          cause = e.as_instanceof_cause()
          if isinstance(cause, UserError):
            raise UserError(str(cause).splitlines()[-1].split("UserError: ")[-1]) from None
          raise
        if on_progress and tasks[i][0] is write_shard:
          on_progress(tasks[i][1][2]["bytes"], out[i]["record"]["tokens"])
  except BaseException:
    for ref in pending:
      ray.cancel(ref, force=True)
    raise
  return out


def _call(fn: Callable, *args: Any) -> Any:
  return fn(*args)


# ----------------------------------------------------------------------------- driver


class _Bar:
  """tokens/s and ETA on one line (a carriage-return bar on a terminal, log lines otherwise)."""

  def __init__(self, total_bytes: int, enabled: bool):
    self.total, self.done, self.tokens, self.enabled = total_bytes, 0, 0, enabled
    self.start = self.last = time.monotonic()
    self.tty = sys.stderr.isatty()

  def __call__(self, done: int, tokens: int) -> None:
    self.done, self.tokens = self.done + done, self.tokens + tokens
    now = time.monotonic()
    if self.enabled and (now - self.last > (0.5 if self.tty else 10) or self.done >= self.total):
      self.last = now
      elapsed = max(now - self.start, 1e-9)
      rate = self.done / elapsed
      eta = (self.total - self.done) / rate if rate else 0
      line = (f"prepared {self.done / 2**20:,.0f}/{self.total / 2**20:,.0f} MiB  "
              f"{self.tokens:,} tokens  {self.tokens / elapsed:,.0f} tokens/s  ETA {eta:,.0f}s")
      print(("\r" + line) if self.tty else line, end="" if self.tty else "\n",
            file=sys.stderr, flush=True)

  def close(self) -> None:
    if self.enabled and self.tty:
      print(file=sys.stderr)


@dataclasses.dataclass(frozen=True)
class Summary:
  path: str
  num_tokens: int
  num_docs: int
  blank_docs: int  # records skipped as empty, blank or null
  shards: int
  reused: int  # shards found complete from an earlier run
  seconds: float
  peak_worker_rss_mb: float  # the largest resident memory of any worker (this process if
  # the work ran here)

  @property
  def tokens_per_s(self) -> float:
    return self.num_tokens / max(self.seconds, 1e-9)


def prepare(cfg: PrepareConfig, show_progress: bool = True) -> Summary:
  """Writes (or completes) the token store `cfg.output` from `cfg.inputs`."""
  from lmjax.data.tokenizer_io import load_tokenizer, serialized
  start = time.monotonic()
  if cfg.engine not in ("local", "ray"):
    raise UserError(f"engine must be 'local' or 'ray', got {cfg.engine!r}")
  if not cfg.split_mb > 0:
    raise UserError(f"split_mb must be positive, got {cfg.split_mb}")
  paths.check_access(cfg.output, write=True)
  if paths.isfile(cfg.output):
    raise UserError(f"output {cfg.output} exists and is not a directory")
  files = readers.expand_inputs(cfg.inputs)
  tokenizer = load_tokenizer(cfg.tokenizer)
  workers = cfg.workers or os.cpu_count() or 1
  settings = Settings(*serialized(tokenizer), tokenizer.sha256, tokenizer.vocab_size, cfg.begin,
                      cfg.end, cfg.text_field, cfg.bad_utf8)
  with _engine(cfg, workers) as run:
    inputs = run([(inspect, (p, int(cfg.split_mb * 2**20))) for p in files], workers, None)
    jobs = _jobs(inputs, settings)
    if workers > 1 and len(jobs) == 1:  # one job runs here: let SentencePiece use the cores
      settings = dataclasses.replace(settings, num_threads=-1)
    paths.makedirs(paths.join(cfg.output, store.SHARDS))
    _remove_stale(paths.join(cfg.output, store.SHARDS))
    bar = _Bar(sum(i["size"] for i in inputs), show_progress)
    fn = write_shard if cfg.engine == "ray" else _local_write_shard
    try:
      results = run([(fn, (cfg.output, settings, job)) for job in jobs], workers, bar)
    finally:
      bar.close()
  index = _index(inputs, jobs, [r["record"] for r in results], settings, cfg)
  _write_index(cfg.output, index)
  return Summary(cfg.output, index["num_tokens"], index["num_docs"], index["blank_docs"],
                 len(jobs), sum(r["reused"] for r in results), time.monotonic() - start,
                 max(r["peak_rss_mb"] for r in results))


def _jobs(inputs: list[dict[str, Any]], settings: Settings) -> list[dict[str, Any]]:
  jobs = []
  for i, info in enumerate(inputs):
    for lo, hi in info["parts"]:
      size = (hi if hi >= 0 else info["size"]) - lo if not info["path"].endswith(".parquet") \
          else info["size"] // len(info["parts"])
      jobs.append({"name": shard_name(settings, info["sha256"], (lo, hi)), "input": i,
                   "path": info["path"], "part": [lo, hi], "bytes": size})
  return jobs


def _index(inputs, jobs, records, settings: Settings, cfg: PrepareConfig) -> dict[str, Any]:
  docs_per_input = [0] * len(inputs)
  shards = []
  for job, record in zip(jobs, records):
    docs_per_input[job["input"]] += record["docs"]
    shards.append({**record, "input": job["input"], "part": job["part"]})
  for info, docs in zip(inputs, docs_per_input):
    if docs == 0:
      raise UserError(f"{info['path']}: no documents (every record is empty or blank)")
  return {"format": store.FORMAT, "version": store.VERSION,
          "tokenizer_sha256": settings.tokenizer_sha256, "vocab_size": settings.vocab_size,
          "begin_id": settings.begin, "end_id": settings.end,
          "dtype": store.token_dtype(settings.vocab_size).str,
          "text_field": settings.text_field, "bad_utf8": settings.bad_utf8,
          "split_mb": float(cfg.split_mb), "num_tokens": sum(r["tokens"] for r in records),
          "num_docs": sum(r["docs"] for r in records),
          # shards written before blank records were counted have no count: 0
          "blank_docs": sum(r.get("blank_docs", 0) for r in records),
          "inputs": [{"path": i["path"], "size": i["size"], "sha256": i["sha256"]}
                     for i in inputs],
          "shards": shards}


def _write_index(output: str, index: dict[str, Any]) -> None:
  paths.write_atomic(paths.join(output, store.INDEX),
                     json.dumps(index, indent=1, sort_keys=True) + "\n")
  keep = {f"{s['name']}.{k}" for s in index["shards"] for k in ("tokens", "docs", "json")}
  folder = paths.join(output, store.SHARDS)
  for name in paths.listdir(folder):  # complete shards of inputs no longer listed
    if name not in keep and not name.startswith("."):
      try:
        paths.remove(paths.join(folder, name))
      except OSError:
        pass
  _remove_stale(folder)
  _remove_stale(output)
  logging.info("token store %s: %d tokens, %d documents (%d blank skipped), %d shards", output,
               index["num_tokens"], index["num_docs"], index["blank_docs"], len(index["shards"]))
