"""Continuous batching over the KV-cache decoder, for a server.

The engine holds one KV cache of `slots` rows, each `cache_len` long, and runs a fixed
set of programs, all compiled at start-up, whatever the requests:

  decode step   (rows, 1): every row samples its next token from the logits its
                last step left, then feeds it. Rows sit at different lengths: each
                row's cache index advances by its own real tokens. `rows` is the
                first of `buckets` (1, 2, 4, ... slots) that holds every busy row:
                requests take the lowest free row, so a light load runs a small
                batch (vLLM captures its CUDA graphs per batch size the same way).
  prefill chunk (1, chunk): up to `chunk` prompt tokens of one row, written into
                that row's cache; also the log-probability of each prompt token
                (for `echo` + `logprobs`) and the row's next-token logits.

A request waits in a queue, takes a free row, is prefilled a chunk per loop
iteration, then decodes with whatever else is running, and leaves its row when it
ends (end-of-sequence, its token budget, or cancelled). Each loop iteration runs
at most one prefill chunk and then one decode step, so a long prompt delays the
running requests by at most one chunk per token. Sampling parameters, seeds and
token budgets are per row (arrays), so they never cause a compilation.

A row's last generated token is never fed back, so a request fits when
prompt <= max_len and prompt + max_tokens <= max_len + 1.
"""

from __future__ import annotations

import dataclasses
import os
import queue
import threading
import time
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from lmjax.errors import UserError
from lmjax.inference.decoder import Decoder, sample, seed_keys, step_keys, token_logprobs
from lmjax.inference.phases import Phases
from lmjax.model import TransformerConfig

Array = jax.Array
# Where the engine thread's time goes (`phases`, in /health): taking requests in, prefill
# chunks, building a step's inputs, dispatching it, waiting for the device, copying its
# results to the host, handing tokens to requests, and waiting for work.
PHASES = ("admit", "prefill", "prepare", "dispatch", "device", "transfer", "emit", "idle")


@dataclasses.dataclass
class Request:
  """One sequence to continue. `emit` receives its events, in order, from the engine thread:
  ("prompt", logprobs, top) once when `echo_logprobs`, ("token", id, logprob, top) per new
  token, and ("done", reason) last, reason one of "stop", "length", "cancelled"."""
  prompt: list[int]
  max_tokens: int
  emit: Callable[[tuple], None]
  temperature: float = 0.0
  top_p: float = 1.0
  top_k: int = 0
  seed: int | None = None
  echo_logprobs: bool = False
  stop_ids: tuple[int, ...] = ()
  cancelled: bool = False
  # set by the engine
  generated: int = 0
  prefilled: int = 0
  arrived: float = 0.0
  prompt_logprobs: list = dataclasses.field(default_factory=list)

  def cancel(self) -> None:
    """Leaves its row at the engine's next step (safe from any thread)."""
    self.cancelled = True


class Engine:
  """Serves requests from a background thread; `submit` and `Request.cancel` from any thread."""

  def __init__(self, cfg: TransformerConfig, params: Any, pad: int, slots: int = 8,
               chunk: int = 64, max_len: int | None = None):
    self.decoder = Decoder(cfg, params, "serving needs a decoder (CLM) model")
    cfg, params = self.decoder.cfg, self.decoder.params
    max_len = min(max_len or cfg.max_len, cfg.max_len)
    if slots < 1 or chunk < 1 or max_len < 2:
      raise UserError(f"--max_batch ({slots}) and the chunk ({chunk}) must be >= 1, "
                      f"--max_len ({max_len}) >= 2")
    self.cfg, self.params, self.pad = cfg, params, pad
    self.slots, self.chunk, self.max_len = slots, min(chunk, max_len), max_len
    # A multiple of the chunk: a chunk written at any multiple of it stays inside the row.
    self.cache_len = -(-max_len // self.chunk) * self.chunk
    self.buckets = sorted({min(2 ** k, slots) for k in range(slots.bit_length() + 1)})
    self._decode = jax.jit(self._decode_fn, donate_argnums=(1, 2), static_argnames="rows")
    self._prefill = jax.jit(self._prefill_fn, donate_argnums=(1, 2))
    self._waiting: queue.Queue[Request] = queue.Queue()
    self._rows: list[Request | None] = [None] * slots
    self._wake = threading.Event()
    self._stop = threading.Event()
    self._thread: threading.Thread | None = None
    self.steps = self.chunks = 0
    self.phases = Phases(PHASES, ("dispatches", "steps", "row_steps", "tokens", "chunks"))
    self.error: BaseException | None = None

  # ----------------------------------------------------------------------------- device

  def _init_state(self) -> tuple[Any, Array]:
    cache = self.decoder.init_cache(self.slots, self.cache_len)
    return cache, jnp.zeros((self.slots, self.cfg.vocab_size), jnp.float32)

  def _apply(self, params, cache, tokens, segments, positions):
    positions = jnp.minimum(positions, self.max_len - 1)  # a finished row's last token
    return self.decoder.forward(params, cache, tokens, segments, positions)

  def _decode_fn(self, params, cache, next_logits, active, positions, temperature, top_p,
                 top_k, keys, counters, *, rows: int):
    """One token for each of the first `rows` rows: (rows,) ids, their log-probabilities and
    top alternatives. The other rows' cache and logits are left as they are."""
    first = lambda a: a[:rows]  # materialised, as in _prefill_fn (1.5x faster here)
    mine, logits = jax.lax.optimization_barrier((jax.tree.map(first, cache), next_logits[:rows]))
    tokens = sample(logits, step_keys(keys, counters), temperature, top_p, top_k)
    tokens = jnp.where(active, tokens, self.pad)
    logprob, top_ids, top_lp = token_logprobs(logits, tokens)
    logits, mine = self._apply(params, mine, tokens[:, None], active[:, None].astype(jnp.int32),
                               positions[:, None])
    put = lambda a, m: jax.lax.dynamic_update_slice_in_dim(a, m, 0, axis=0)
    cache = jax.tree.map(put, cache, mine)
    return cache, put(next_logits, logits[:, 0]), tokens, logprob, top_ids, top_lp

  def _prefill_fn(self, params, cache, next_logits, row, fresh, tokens, targets, n):
    """Writes `n` real tokens of (1, C) `tokens` into cache row `row` (emptied first when
    `fresh`); returns the log-probabilities of `targets` (the following tokens) too."""
    take = lambda a: jax.lax.dynamic_slice_in_dim(a, row, 1, axis=0)
    mine = jax.tree.map(take, cache)
    empty = lambda path, a: jnp.where(fresh, jnp.zeros_like(a), a) if path[-1].key in (
        "index", "valid") else a
    # Materialised: XLA:CPU otherwise fuses the slice at a traced row into every reader of
    # the cache and the chunk runs 2.5x slower (measured; benchmarks.serve).
    mine = jax.lax.optimization_barrier(jax.tree_util.tree_map_with_path(empty, mine))
    start = _mask_index(mine)  # (1,) the row's length so far
    real = jnp.arange(tokens.shape[1]) < n
    segments = real[None].astype(jnp.int32)
    positions = (start[:, None] + jnp.arange(tokens.shape[1])[None]) * segments
    logits, mine = self._apply(params, mine, tokens, segments, positions)  # (1, C, V)
    mine = jax.lax.optimization_barrier(mine)
    cache = jax.tree.map(lambda a, m: jax.lax.dynamic_update_slice_in_dim(a, m, row, axis=0),
                         cache, mine)
    next_logits = jax.lax.dynamic_update_slice_in_dim(
        next_logits, jax.lax.dynamic_index_in_dim(logits[0], n - 1, keepdims=True), row, axis=0)
    logprob, top_ids, top_lp = token_logprobs(logits[0], targets[0])
    return cache, next_logits, logprob, top_ids, top_lp

  # ----------------------------------------------------------------------------- host

  def start(self) -> "Engine":
    """Compiles both programs (with a request that fills no row), then serves."""
    self._cache, self._next = self._init_state()
    self._keys = np.zeros((self.slots, 2), np.uint32)
    idle = Request([self.pad], 1, lambda event: None)
    self._run_chunk(0, idle)
    for rows in self.buckets:
      self._run_decode(np.zeros(self.slots, bool), rows)
    self._thread = threading.Thread(target=self._loop, name="lmjax-engine", daemon=True)
    self._thread.start()
    return self

  def submit(self, request: Request) -> None:
    """Queues a request; its events arrive through `request.emit`."""
    if not 1 <= len(request.prompt) <= self.max_len:
      raise UserError(f"the prompt has {len(request.prompt)} tokens; the model takes 1 to "
                      f"{self.max_len}")
    room = self.max_len + 1 - len(request.prompt)
    request.max_tokens = min(request.max_tokens, room)
    if request.max_tokens < 1:
      raise UserError("max_tokens must be >= 1")
    if request.seed is None:
      request.seed = int.from_bytes(os.urandom(4), "little")
    if self.error is not None or self._stop.is_set():
      raise RuntimeError("the engine has stopped")
    self._waiting.put(request)
    self._wake.set()

  def stop(self, timeout: float = 30.0) -> None:
    """Cancels what is running and waiting; returns when the loop has ended."""
    self._stop.set()
    self._wake.set()
    if self._thread is not None:
      self._thread.join(timeout)

  def busy_rows(self) -> int:
    return sum(r is not None for r in self._rows)

  def cache_bytes(self) -> int:
    """Bytes of the KV cache (all rows)."""
    return sum(a.nbytes for a in jax.tree.leaves(self._cache))

  def _loop(self) -> None:
    ph = self.phases
    try:
      while not self._stop.is_set():
        t = time.perf_counter()
        self._admit()
        prefilling = [i for i, r in enumerate(self._rows)
                      if r is not None and r.prefilled < len(r.prompt)]
        decoding = np.array([r is not None and r.prefilled == len(r.prompt)
                             for r in self._rows])
        t = ph.since("admit", t)
        if prefilling:  # oldest first: one chunk, then a decode step for the others
          self._prefill_row(min(prefilling, key=lambda i: self._rows[i].arrived))
          t = ph.since("prefill", t)
        if decoding.any():
          self._decode_rows(decoding)
        if not prefilling and not decoding.any():
          self._wake.wait(0.5)
          self._wake.clear()
          ph.since("idle", t)
        ph.mark_cpu()
    except BaseException as e:  # noqa: BLE001  (reported to every request; the server says so)
      self.error = e
      raise
    finally:
      for i, r in enumerate(self._rows):
        if r is not None:
          self._finish(i, "cancelled")
      while not self._waiting.empty():
        self._waiting.get().emit(("done", "cancelled"))

  def _admit(self) -> None:
    for i, r in enumerate(self._rows):
      if r is not None and r.cancelled:
        self._finish(i, "cancelled")
    while not self._waiting.empty() and None in self._rows:
      r = self._waiting.get()
      if r.cancelled:
        r.emit(("done", "cancelled"))
        continue
      r.arrived = time.monotonic()
      self._rows[self._rows.index(None)] = r

  def _finish(self, i: int, reason: str) -> None:
    r, self._rows[i] = self._rows[i], None
    r.emit(("done", reason))

  def _run_chunk(self, i: int, r: Request) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    begin = r.prefilled
    piece = r.prompt[begin:begin + self.chunk]
    following = r.prompt[begin + 1:begin + 1 + self.chunk]
    tokens = np.full((1, self.chunk), self.pad, np.int32)
    targets = np.zeros_like(tokens)
    tokens[0, :len(piece)], targets[0, :len(following)] = piece, following
    (self._cache, self._next, logprob, top_ids, top_lp) = self._prefill(
        self.params, self._cache, self._next, np.int32(i), np.bool_(begin == 0), tokens,
        targets, np.int32(len(piece)))
    self.chunks += 1
    self.phases.count("chunks")
    return logprob, top_ids, top_lp, len(piece)

  def _prefill_row(self, i: int) -> None:
    r = self._rows[i]
    logprob, top_ids, top_lp, n = self._run_chunk(i, r)
    if r.echo_logprobs:
      logprob, top_ids, top_lp = jax.device_get((logprob, top_ids, top_lp))
      for j in range(n):
        if r.prefilled + j + 1 < len(r.prompt):
          r.prompt_logprobs.append((float(logprob[j]), _top(top_ids[j], top_lp[j])))
    r.prefilled += n
    if r.prefilled == len(r.prompt):
      self._keys[i] = seed_keys([r.seed])[0]
      if r.echo_logprobs:
        r.emit(("prompt", [None] + [lp for lp, _ in r.prompt_logprobs],
                [None] + [top for _, top in r.prompt_logprobs]))

  def _run_decode(self, active: np.ndarray, rows: int) -> tuple:
    ph, t = self.phases, time.perf_counter()
    active = active[:rows]
    requests = [r if a else None for r, a in zip(self._rows, active)]
    value = lambda f, default: np.array([f(r) if r else default for r in requests])
    args = (active, value(lambda r: len(r.prompt) + r.generated, 0).astype(np.int32),
            value(lambda r: r.temperature, 0.0).astype(np.float32),
            value(lambda r: r.top_p, 1.0).astype(np.float32),
            value(lambda r: r.top_k, 0).astype(np.int32), self._keys[:rows],
            value(lambda r: r.generated, 0).astype(np.int32))
    t = ph.since("prepare", t)
    (self._cache, self._next, *out) = self._decode(self.params, self._cache, self._next, *args,
                                                   rows=rows)
    t = ph.since("dispatch", t)
    jax.block_until_ready(out)
    t = ph.since("device", t)
    self.steps += 1
    out = tuple(jax.device_get(out))
    ph.since("transfer", t)
    ph.count("dispatches")
    ph.count("steps")
    ph.count("row_steps", int(active.sum()))
    return out

  def _decode_rows(self, active: np.ndarray) -> None:
    busy = int(np.flatnonzero(active)[-1]) + 1
    tokens, logprob, top_ids, top_lp = self._run_decode(
        active, next(b for b in self.buckets if b >= busy))
    t = time.perf_counter()
    for i in np.flatnonzero(active):
      r = self._rows[i]
      token = int(tokens[i])
      r.generated += 1
      if token in r.stop_ids:
        self._finish(i, "stop")
        continue
      r.emit(("token", token, float(logprob[i]), _top(top_ids[i], top_lp[i])))
      self.phases.count("tokens")
      if r.generated >= r.max_tokens:
        self._finish(i, "length")
    self.phases.since("emit", t)


def _mask_index(cache: dict) -> Array:
  """The cache mask's (rows,) index, wherever the model keeps it."""
  found = [a for path, a in jax.tree_util.tree_leaves_with_path(cache)
           if path[-1].key == "index" and "cache_mask" in jax.tree_util.keystr(path)]
  return found[0]


def _top(ids: np.ndarray, logprobs: np.ndarray) -> list[tuple[int, float]]:
  return [(int(i), float(lp)) for i, lp in zip(ids, logprobs)]


def generate_all(engine: Engine, prompts: Sequence[list[int]], max_tokens: int,
                 stop_ids: tuple[int, ...] = (), timeout: float = 600.0) -> list[list[int]]:
  """Greedy continuations of `prompts`, all submitted at once (for tests and benchmarks)."""
  outs: list[list[int]] = [[] for _ in prompts]
  done = [threading.Event() for _ in prompts]

  def emitter(k):
    def emit(event):
      if event[0] == "token":
        outs[k].append(event[1])
      elif event[0] == "done":
        done[k].set()
    return emit
  for k, p in enumerate(prompts):
    engine.submit(Request(list(p), max_tokens, emitter(k), stop_ids=stop_ids))
  for d in done:
    if not d.wait(timeout):
      raise TimeoutError("the engine did not finish in time")
  return outs
