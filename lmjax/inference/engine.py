"""Continuous batching over the KV-cache decoder, for a server.

The engine holds a KV cache of up to `slots` rows, each `cache_len` long, and runs a
fixed set of programs, all compiled at start-up, whatever the requests:

  decode        (rows, 1), up to `steps_per_dispatch` times in one program (a loop on
                the device): every row samples its next token from the logits its last
                step left, then feeds it. Rows sit at different lengths: each row's
                cache index advances by its own real tokens. A row ends on the device
                when it draws one of its stop ids or its last token, and feeds nothing
                more. `rows` is the cache's size now, one of `buckets` (1, 2, 4, ...
                slots): requests take the lowest free row and the cache holds the first
                bucket that covers the busy rows, so a light load runs a small batch (vLLM
                captures its CUDA graphs per batch size the same way) and the program
                updates the cache in place, never a copy of some of its rows. The number
                of steps is an argument, not a shape.
  prefill       (1, width): up to `chunk` prompt tokens of one request, written into a
                one-row staging cache, at the smallest of `widths` (16, 32, ... chunk)
                that holds them; also the log-probability of each prompt token (for
                `echo` + `logprobs`) and the next-token logits. After a prompt's last
                chunk, the staging row is copied into the request's cache row.
  resize        the cache to the next bucket up or down (grown when a request takes a
                row it lacks; shrunk when no row runs, or after SHRINK_AFTER dispatches
                that a smaller size would have held).

A request waits in a queue, takes a free row, is prefilled a chunk per loop
iteration (oldest request first), then decodes with whatever else is running, and leaves its row when it
ends (end-of-sequence, its token budget, or cancelled). Each loop iteration runs
at most one prefill chunk and then one decode dispatch. The host's work per dispatch
(copying the rows' inputs in, the results out, handing tokens to requests) does not
depend on how many steps it runs, so a dispatch runs up to `steps_per_dispatch` steps,
as many as fit `dispatch_ms` of device time (a request arriving mid-dispatch waits for
it), except while a request is being prefilled or waits for a free row: then it runs one
(or, when no row is free, until the first row's budget ends), so a new request's first
token comes from the dispatch that follows its last prefill chunk and a long prompt still
delays the running requests by at most one chunk per token. Sampling parameters, seeds,
stop ids and token budgets are per row (arrays, `batch_state.py`), so they never cause a
compilation.

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
from lmjax.inference import batch_state as bs
from lmjax.inference.decoder import (TOP_LOGPROBS, Decoder, sample, step_keys,
                                     token_logprobs)
from lmjax.inference.phases import Phases
from lmjax.model import TransformerConfig

Array = jax.Array
# Where the engine thread's time goes (`phases`, in /health): taking requests in, prefill
# chunks, building a step's inputs, dispatching it, waiting for the device, copying its
# results to the host, handing tokens to requests, and waiting for work.
PHASES = ("admit", "prefill", "prepare", "dispatch", "device", "transfer", "emit", "resize",
          "idle")
# Dispatches in a row for which a smaller cache would have held every busy row before the
# cache shrinks to it: a load that hovers at a bucket's edge does not copy back and forth.
SHRINK_AFTER = 8


@dataclasses.dataclass
class Request:
  """One sequence to continue. `emit` receives its events, in order, from the engine thread:
  ("prompt", logprobs, top) once when `echo_logprobs`, ("token", id, logprob, top) per new
  token (logprob and top None unless `token_logprobs`), and ("done", reason) last, reason
  one of "stop", "length", "cancelled". A dispatch's events of one request come one after
  another, in one burst."""
  prompt: list[int]
  max_tokens: int
  emit: Callable[[tuple], None]
  temperature: float = 0.0
  top_p: float = 1.0
  top_k: int = 0
  seed: int | None = None
  echo_logprobs: bool = False
  token_logprobs: bool = True  # each token's log-probability and top alternatives
  stop_ids: tuple[int, ...] = ()
  cancelled: bool = False
  # set by the engine
  generated: int = 0
  stop_id: int | None = None  # the stop id that ended it (not emitted), if one did
  prefilled: int = 0
  arrived: float = 0.0
  prompt_logprobs: list = dataclasses.field(default_factory=list)

  def cancel(self) -> None:
    """Leaves its row at the engine's next step (safe from any thread)."""
    self.cancelled = True


class Engine:
  """Serves requests from a background thread; `submit` and `Request.cancel` from any thread."""

  def __init__(self, cfg: TransformerConfig, params: Any, pad: int, slots: int = 8,
               chunk: int = 64, max_len: int | None = None, steps_per_dispatch: int = 8,
               dispatch_ms: float = 10.0, wrap_model: Callable[[Any], Any] | None = None):
    """`wrap_model`: applied to the decoding model (GRPO's rollouts: LoRA's base + adapters)."""
    self.decoder = Decoder(cfg, params, "serving needs a decoder (CLM) model", wrap_model)
    cfg, params = self.decoder.cfg, self.decoder.params
    max_len = min(max_len or cfg.max_len, cfg.max_len)
    if slots < 1 or chunk < 1 or max_len < 2 or steps_per_dispatch < 1:
      raise UserError(f"--max_batch ({slots}), the chunk ({chunk}) and the steps per dispatch "
                      f"({steps_per_dispatch}) must be >= 1, --max_len ({max_len}) >= 2")
    self.steps_per_dispatch = steps_per_dispatch
    # A dispatch's steps are also capped at about `dispatch_ms` of device time (from each
    # batch size's recent seconds per step): a request arriving mid-dispatch waits for it.
    self.dispatch_seconds = dispatch_ms / 1e3
    self._step_seconds: dict[int, float] = {}
    self.cfg, self.params, self.pad = cfg, params, pad
    self.slots, self.chunk, self.max_len = slots, min(chunk, max_len), max_len
    # A multiple of the chunk: a chunk written at any multiple of it stays inside the row.
    self.cache_len = -(-max_len // self.chunk) * self.chunk
    self.buckets = sorted({min(2 ** k, slots) for k in range(slots.bit_length() + 1)})
    self._decode = jax.jit(self._decode_fn, donate_argnums=(1, 2))
    self._prefill = jax.jit(self._prefill_fn, donate_argnums=(1,))
    # Bound methods: a jit cache of this engine's own (the tests count its programs).
    self._insert = jax.jit(self._insert_fn, donate_argnums=(0, 1))
    # Prefill widths: powers of two from 16 up to the chunk, so that a short prompt (or a
    # long one's last piece) runs at most twice the positions it has, not a whole chunk.
    self.widths = sorted({min(self.chunk, 16 << k) for k in range(self.chunk.bit_length())})
    self._resize = jax.jit(self._resize_fn, static_argnames="rows")
    self._size, self._small_for = self.buckets[0], 0  # the cache's rows now; see _fit
    self._waiting: queue.Queue[Request] = queue.Queue()
    self._rows: list[Request | None] = [None] * slots
    self._table = bs.RowTable(slots)
    self._wake = threading.Event()
    self._stop = threading.Event()
    self._thread: threading.Thread | None = None
    self.steps = self.chunks = 0
    self.phases = Phases(PHASES, ("dispatches", "steps", "row_steps", "tokens", "chunks",
                                  "resizes"))
    self.error: BaseException | None = None

  # ----------------------------------------------------------------------------- device

  def _init_state(self) -> None:
    """The cache at its smallest size, and the one-row staging cache prompts are prefilled
    into (one at a time, oldest first) before they join the running rows."""
    self._size, self._small_for = self.buckets[0], 0
    self._cache = self.decoder.init_cache(self._size, self.cache_len)
    self._next = jnp.zeros((self._size, self.cfg.vocab_size), jnp.float32)
    self._staging, self._staged = self.decoder.init_cache(1, self.cache_len), None
    self._staged_next = jnp.zeros((1, self.cfg.vocab_size), jnp.float32)

  def _apply(self, params, cache, tokens, segments, positions):
    positions = jnp.minimum(positions, self.max_len - 1)  # a finished row's last token
    return self.decoder.forward(params, cache, tokens, segments, positions)

  def _decode_fn(self, params, cache, next_logits, ints, floats, steps):
    """Up to `steps` tokens for each active row of the cache (`batch_state`'s tables, one row
    each): (rows, steps_per_dispatch, RECORD) records. Idle rows' cache and logits are left
    as they are."""
    rows = next_logits.shape[0]
    row = bs.unpack_inputs(ints, floats)

    def step(carry):
      s, cache, logits, active, generated, records = carry
      tokens = sample(logits, step_keys(row["keys"], generated), row["temperature"],
                      row["top_p"], row["top_k"])
      tokens = jnp.where(active, tokens, self.pad)
      logprob, top_ids, top_lp = jax.lax.cond(  # only when some row asks for them
          jnp.any(active & row["logprobs"]), token_logprobs, _no_logprobs, logits, tokens)
      stopped = active & jnp.any(tokens[:, None] == row["stops"], axis=1)
      generated = generated + active
      last = active & ~stopped & (generated >= row["budget"])
      status = jnp.select([stopped, last, active], [bs.STOPPED, bs.LAST, bs.TOKEN], bs.IDLE)
      records = jax.lax.dynamic_update_index_in_dim(
          records, bs.pack_record(status, tokens, top_ids, logprob, top_lp), s, axis=1)
      going = active & ~stopped & ~last  # only a row that goes on feeds its token
      positions = row["length"] + generated - 1
      logits, cache = self._apply(params, cache, tokens[:, None],
                                  going[:, None].astype(jnp.int32), positions[:, None])
      return s + 1, cache, logits[:, 0], going, generated, records

    records = jnp.zeros((rows, self.steps_per_dispatch, bs.RECORD), jnp.int32)
    carry = (jnp.int32(0), cache, next_logits, row["active"], row["generated"], records)
    carry = jax.lax.while_loop(lambda c: (c[0] < steps) & jnp.any(c[3]), step, carry)
    # An idle row keeps its logits: it may have just been prefilled.
    logits = jnp.where(row["active"][:, None], carry[2], next_logits)
    return carry[1], logits, carry[5]

  def _prefill_fn(self, params, cache, fresh, tokens, targets, n):
    """Writes `n` real tokens of (1, W) `tokens` into the one-row staging `cache` (emptied
    first when `fresh`): the cache, the next-token logits after them (1, V), and the
    log-probabilities of `targets` (the following tokens)."""
    empty = lambda path, a: jnp.where(fresh, jnp.zeros_like(a), a) if path[-1].key in (
        "index", "valid") else a
    cache = jax.tree_util.tree_map_with_path(empty, cache)
    start = _mask_index(cache)  # (1,) the row's length so far
    real = jnp.arange(tokens.shape[1]) < n
    segments = real[None].astype(jnp.int32)
    positions = (start[:, None] + jnp.arange(tokens.shape[1])[None]) * segments
    logits, cache = self._apply(params, cache, tokens, segments, positions)  # (1, W, V)
    last = jax.lax.dynamic_index_in_dim(logits[0], n - 1, keepdims=True)
    logprob, top_ids, top_lp = token_logprobs(logits[0], targets[0])
    return cache, last, logprob, top_ids, top_lp

  def _insert_fn(self, cache: Any, next_logits: Array, staged: Any, staged_next: Array,
                 row: Array) -> tuple[Any, Array]:
    """Row `row` of the cache and next-token logits becomes the staging row's."""
    put = lambda a, m: jax.lax.dynamic_update_slice_in_dim(a, m, row, axis=0)
    return jax.tree.map(put, cache, staged), put(next_logits, staged_next)

  def _resize_fn(self, cache: Any, next_logits: Array, *, rows: int) -> tuple[Any, Array]:
    """The cache and next-token logits with `rows` rows: the first ones kept, new ones empty
    (a zero cache index: nothing cached)."""
    def fit(a):
      if a.shape[0] >= rows:
        return a[:rows]
      return jnp.pad(a, [(0, rows - a.shape[0])] + [(0, 0)] * (a.ndim - 1))
    return jax.tree.map(fit, cache), fit(next_logits)

  # ----------------------------------------------------------------------------- host

  def start(self) -> "Engine":
    """Compiles every program (with a request that fills no row), then serves: at each cache
    size a prefill chunk and a decode dispatch, and the copies to the next size and back."""
    self._init_state()
    for width in self.widths:
      self._run_chunk(Request([self.pad] * width, 1, lambda event: None))
    for k, rows in enumerate(self.buckets):  # no row is active: nothing changes
      self._cache, self._next = self._insert(self._cache, self._next, self._staging,
                                             self._staged_next, np.int32(0))
      self._run_decode(rows, 1)
      if k + 1 < len(self.buckets):
        self._fit(self.buckets[k + 1])
    for rows in reversed(self.buckets[:-1]):
      self._fit(rows)
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
    bs.check_stop_ids(request.stop_ids)
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

  def update_params(self, params: Any) -> None:
    """Decodes with `params` from the next dispatch on (an RL trainer's current policy): the
    same shapes, so nothing compiles again. Device arrays are used where they are, not
    copied (a scanned model's layers are unstacked: one copy of them)."""
    self.params = self.decoder.params = self.decoder.layout(params)

  def complete(self, requests: Sequence[Request]) -> None:
    """Runs `requests` to their ends on the calling thread (not while `start` serves): each
    prompt prefilled whole when it takes a row, then decode dispatches of
    `steps_per_dispatch` steps, freed rows taking the next requests between dispatches. No
    timing decides anything, so the same requests and parameters give the same tokens,
    bitwise, on every call."""
    if self._thread is not None:
      raise RuntimeError("complete() runs requests on the calling thread; the engine serves")
    if not hasattr(self, "_cache"):
      self._init_state()
    self._fit(self.buckets[0])  # the sizes it runs at follow from `requests` alone
    for r in requests:
      self.submit(r)
    while self.busy_rows() or not self._waiting.empty():
      self._admit()
      for i, r in enumerate(self._rows):
        while r is not None and r.prefilled < len(r.prompt):
          self._prefill_row(i)
      if self._table.active().any():
        self._decode_rows(False, self.steps_per_dispatch)

  def busy_rows(self) -> int:
    return sum(r is not None for r in self._rows)

  def cache_bytes(self) -> int:
    """Bytes of the KV cache at its full size (`slots` rows; it holds fewer while fewer are
    busy)."""
    return sum(a.nbytes // a.shape[0] for a in jax.tree.leaves(self._cache)) * self.slots

  def _loop(self) -> None:
    ph = self.phases
    try:
      while not self._stop.is_set():
        t = time.perf_counter()
        self._admit()
        prefilling = [i for i, r in enumerate(self._rows)
                      if r is not None and r.prefilled < len(r.prompt)]
        t = ph.since("admit", t)
        if prefilling:  # oldest first: one chunk, then a decode dispatch for the others
          self._prefill_row(min(prefilling, key=lambda i: self._rows[i].arrived))
          t = ph.since("prefill", t)
        if self._table.active().any():
          self._decode_rows(bool(prefilling))
        elif not prefilling:
          self._fit(self.buckets[0])  # nothing runs: the smallest cache, for the next request
          t = time.perf_counter()
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
      i = self._rows.index(None)
      self._rows[i] = r
      if i >= self._size:
        self._fit(next(b for b in self.buckets if b > i))

  def _fit(self, rows: int) -> None:
    """Grows or shrinks the cache to `rows` rows (a bucket), one bucket at a time (the copies
    compiled at start-up), keeping the rows both sizes have. A decode dispatch runs every row
    of the cache, so the cache holds as many rows as the busy ones need: the decode program
    reads and writes it in place, never a copy of some of its rows."""
    t = time.perf_counter()
    while self._size != rows:
      k = self.buckets.index(self._size)
      self._size = self.buckets[k + 1 if rows > self._size else k - 1]
      self._cache, self._next = self._resize(self._cache, self._next, rows=self._size)
      self.phases.count("resizes")
    self._small_for = 0
    self.phases.since("resize", t)

  def _shrink_if_idle_rows(self) -> None:
    """After SHRINK_AFTER dispatches in a row that a smaller cache would have held."""
    busy = [i for i, r in enumerate(self._rows) if r is not None]
    need = next(b for b in self.buckets if b > (busy[-1] if busy else 0))
    self._small_for = self._small_for + 1 if need < self._size else 0
    if self._small_for >= SHRINK_AFTER:
      self._fit(need)

  def _finish(self, i: int, reason: str) -> None:
    r, self._rows[i] = self._rows[i], None
    self._table.end(i)
    r.emit(("done", reason))

  def _run_chunk(self, r: Request) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """`r`'s next prompt piece into the staging row, at the smallest width that holds it."""
    begin = r.prefilled
    piece = r.prompt[begin:begin + self.chunk]
    following = r.prompt[begin + 1:begin + 1 + self.chunk]
    width = next(w for w in self.widths if w >= len(piece))
    tokens = np.full((1, width), self.pad, np.int32)
    targets = np.zeros_like(tokens)
    tokens[0, :len(piece)], targets[0, :len(following)] = piece, following
    (self._staging, self._staged_next, logprob, top_ids, top_lp) = self._prefill(
        self.params, self._staging, np.bool_(begin == 0), tokens, targets, np.int32(len(piece)))
    self.chunks += 1
    self.phases.count("chunks")
    return logprob, top_ids, top_lp, len(piece)

  def _prefill_row(self, i: int) -> None:
    """One chunk of row i's prompt (the oldest being prefilled: the staging row holds it
    until its last chunk, then its cache row takes it and it decodes with the others)."""
    r = self._rows[i]
    if r.prefilled and self._staged is not r:
      raise RuntimeError("a prompt's prefill was interrupted by another's")  # never: see _loop
    self._staged = r
    logprob, top_ids, top_lp, n = self._run_chunk(r)
    if r.echo_logprobs:
      logprob, top_ids, top_lp = jax.device_get((logprob, top_ids, top_lp))
      for j in range(n):
        if r.prefilled + j + 1 < len(r.prompt):
          r.prompt_logprobs.append((float(logprob[j]), _top(top_ids[j], top_lp[j])))
    r.prefilled += n
    if r.prefilled == len(r.prompt):
      self._cache, self._next = self._insert(self._cache, self._next, self._staging,
                                             self._staged_next, np.int32(i))
      self._table.start(i, len(r.prompt), r.max_tokens, r.temperature, r.top_p, r.top_k, r.seed,
                        r.stop_ids, r.token_logprobs)
      if r.echo_logprobs:
        r.emit(("prompt", [None] + [lp for lp, _ in r.prompt_logprobs],
                [None] + [top for _, top in r.prompt_logprobs]))

  def _steps(self, prefilling: bool, rows: int) -> int:
    """Decode steps for this dispatch: one while a request is being prefilled (its first
    token comes from the dispatch that follows its last chunk, in the same iteration) or
    waits for a free row; else as many as fit `dispatch_ms` at this batch size's recent
    speed, at most `steps_per_dispatch`, and when requests wait for a row to end, no more
    than the first budget to run out."""
    waiting = not self._waiting.empty()
    if prefilling or (waiting and None in self._rows):
      return 1
    per_step = self._step_seconds.get(rows)
    fit = self.steps_per_dispatch if per_step is None else int(self.dispatch_seconds / per_step)
    steps = int(np.clip(fit, 1, self.steps_per_dispatch))
    if waiting:
      steps = min(steps, max(int(self._table.remaining().min()), 1))
    return steps

  def _run_decode(self, rows: int, steps: int) -> tuple[np.ndarray, float]:
    """One dispatch of the cache's `rows` rows: its records (rows, steps_per_dispatch, RECORD)
    and the seconds from its dispatch to its results."""
    ph, t = self.phases, time.perf_counter()
    ints, floats = self._table.ints[:rows].copy(), self._table.floats[:rows].copy()
    t = began = ph.since("prepare", t)
    self._cache, self._next, records = self._decode(self.params, self._cache, self._next, ints,
                                                    floats, np.int32(steps))
    t = ph.since("dispatch", t)
    records.block_until_ready()
    t = ph.since("device", t)
    records = np.asarray(records)  # the one copy to the host
    ph.since("transfer", t)
    ph.count("dispatches")
    return records, t - began

  def _decode_rows(self, prefilling: bool, steps: int = 0) -> None:
    rows = self._size
    records, seconds = self._run_decode(rows, steps or self._steps(prefilling, rows))
    t = time.perf_counter()
    drawn = np.count_nonzero(records[..., 0], axis=1)  # (rows,) tokens each row drew
    ran = int(drawn.max())
    if ran:  # a running average, so that a slow moment on a shared machine passes
      last = self._step_seconds.get(rows, seconds / ran)
      self._step_seconds[rows] = 0.8 * last + 0.2 * seconds / ran
    self.steps += ran
    self.phases.count("steps", ran)
    self.phases.count("row_steps", int(drawn.sum()))
    self._table.ints[:rows, bs.GENERATED] += drawn.astype(np.int32)
    out = bs.unpack_records(records[np.flatnonzero(drawn), :ran])
    for k, i in enumerate(np.flatnonzero(drawn).tolist()):
      self._hand_over(i, int(drawn[i]), *(out[key][k] for key in (
          "status", "token", "logprob", "top_ids", "top_logprobs")))
    self.phases.since("emit", t)
    self._shrink_if_idle_rows()

  def _hand_over(self, i: int, drawn: int, status: list, tokens: list, logprob: list,
                 top_ids: list, top_lp: list) -> None:
    """Row i's tokens of one dispatch, as events to its request, and its end if it ended."""
    r = self._rows[i]
    r.generated += drawn
    for s in range(drawn):
      if status[s] == bs.STOPPED:
        r.stop_id = tokens[s]
        self._finish(i, "stop")
        return
      if r.token_logprobs:
        r.emit(("token", tokens[s], logprob[s], list(zip(top_ids[s], top_lp[s]))))
      else:
        r.emit(("token", tokens[s], None, None))
      self.phases.count("tokens")
      if status[s] == bs.LAST:
        self._finish(i, "length")
        return


def _no_logprobs(logits: Array, tokens: Array) -> tuple[Array, Array, Array]:
  """`token_logprobs`'s shapes, zeros: what rows that did not ask for them get."""
  n = tokens.shape[0]
  return (jnp.zeros((n,), jnp.float32), jnp.zeros((n, TOP_LOGPROBS), jnp.int32),
          jnp.zeros((n, TOP_LOGPROBS), jnp.float32))


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
    engine.submit(Request(list(p), max_tokens, emitter(k), stop_ids=stop_ids,
                          token_logprobs=False))
  for d in done:
    if not d.wait(timeout):
      raise TimeoutError("the engine did not finish in time")
  return outs
