"""Weighted mixtures of named sources, in stages, with every batch a function of (seed, step).

`data.mixture` names sources, each a list of corpus entries (token stores or text, as
`data.train_files`) with a weight and optional stages, `((step, weight), ...)`: from
that step on, the source's weight is the new one. At every step the weights in force
are normalised over the sources.

Deterministic and exact, in blocks (Levanter's block-deterministic mixture does the
same): the endless sequence of row positions (step x batch + row) is cut, within each
stage, into blocks of `BLOCK` rows. A block holds each source's share of its rows
exactly (the largest-remainder rounding of weight x BLOCK), in an order that is a
keyed permutation of (seed, stage, block). The k-th row a source gives is window k of
that source's own endless shuffled epoch sequence (`PackedDataset`, keyed by the seed
and the source's index), so nothing depends on iterator state or on how many
processes read: a resumed run, or one on another host count, reads the same rows.

A source read past its end wraps into a new epoch (`data.mixture_exhausted=wrap`,
counted in the metrics as `data/<source>/wraps`), or the run stops with a checkpoint
before the first batch that would reread it (`stop`). Each source with `eval_files`
is evaluated on its own at every evaluation, as `eval/<source>/<metric>`.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Mapping, Sequence

import numpy as np
from absl import logging

from lmjax.data.batches import Batch, PackedDataset
from lmjax.data.permutation import permute, round_keys
from lmjax.errors import UserError

BLOCK = 2048  # rows per block: within one, every source's share is exact to 1/BLOCK
SALT = 0x6D6978  # keeps the mixture's permutations apart from a plain dataset's
SOURCE_KEYS = ("train_files", "eval_files", "weight", "stages")


@dataclasses.dataclass(frozen=True)
class Source:
  name: str
  train_files: tuple[str, ...]  # corpus entries, as data.train_files
  eval_files: tuple[str, ...] = ()  # its own held-out entries (per-source eval loss)
  weight: float = 1.0  # from step 0
  stages: tuple[tuple[int, float], ...] = ()  # (from step, weight), ascending


def parse_mixture(mixture: Mapping[str, Any]) -> tuple[Source, ...]:
  """`data.mixture` as typed sources; a mistake is a ValueError naming the source."""
  out = []
  for name, spec in mixture.items():
    where = f"data.mixture.{name}"
    if not isinstance(spec, Mapping):
      raise ValueError(f"{where} must be a dict with train_files and weight, got {spec!r}")
    unknown = sorted(set(spec) - set(SOURCE_KEYS))
    if unknown:
      raise ValueError(f"{where}: unknown key(s) {', '.join(unknown)} (known: "
                       f"{', '.join(SOURCE_KEYS)})")
    files = spec.get("train_files", ())
    files = (files,) if isinstance(files, str) else tuple(files)
    evals = spec.get("eval_files", ())
    evals = (evals,) if isinstance(evals, str) else tuple(evals)
    if not files:
      raise ValueError(f"{where}.train_files is empty: give its corpus entries")
    weight = spec.get("weight", 1.0)
    stages = tuple((int(s), float(w)) for s, w in spec.get("stages", ()))
    if not isinstance(weight, (int, float)) or weight < 0 or any(w < 0 for _, w in stages):
      raise ValueError(f"{where}: weights must be numbers >= 0, got {weight!r} {stages!r}")
    if any(s < 1 for s, _ in stages) or list(stages) != sorted(stages):
      raise ValueError(f"{where}.stages must be (step >= 1, weight) pairs in step order, "
                       f"got {stages!r}")
    out.append(Source(str(name), files, evals, float(weight), stages))
  for start, weights in stage_weights(out) if out else ():
    if not weights.sum() > 0:
      raise ValueError(f"data.mixture: every weight is 0 from step {start}")
  return tuple(out)


def as_config(sources: Sequence[Source]) -> dict[str, dict[str, Any]]:
  """The sources as the plain dict `data.mixture` holds (JSON-friendly, round-trips)."""
  return {s.name: {"train_files": s.train_files, "eval_files": s.eval_files,
                   "weight": s.weight, "stages": s.stages} for s in sources}


def stage_weights(sources: Sequence[Source]) -> list[tuple[int, np.ndarray]]:
  """[(first step of the stage, each source's weight, normalised)], the first at step 0."""
  starts = sorted({0} | {s for src in sources for s, _ in src.stages})
  out = []
  for start in starts:
    w = np.array([next((w for s, w in reversed(src.stages) if s <= start), src.weight)
                  for src in sources], dtype=np.float64)
    out.append((start, w / w.sum() if w.sum() > 0 else w))
  return out


def block_counts(weights: np.ndarray, block: int = BLOCK) -> np.ndarray:
  """Each source's rows in a block: weight x block, rounded by largest remainder."""
  raw = weights * block
  counts = np.floor(raw).astype(np.int64)
  order = np.argsort(-(raw - counts), kind="stable")  # largest remainders first
  counts[order[:block - counts.sum()]] += 1
  return counts


class MixtureDataset:
  """Train rows drawn from several `PackedDataset`s by weight; `batch` as a plain one's."""

  def __init__(self, names: Sequence[str], sources: Sequence[PackedDataset],
               stages: list[tuple[int, np.ndarray]], seed: int, exhausted: str = "wrap",
               evals: Mapping[str, PackedDataset] | None = None):
    self.names, self.sources, self.seed, self.exhausted = list(names), list(sources), seed, exhausted
    self.stage_steps = [start for start, _ in stages]
    self.counts = [block_counts(w) for _, w in stages]  # (stages, sources) rows per block
    self.evals = dict(evals or {})

  @functools.lru_cache(maxsize=64)
  def _order(self, stage: int, block: int) -> np.ndarray:
    """Source of each slot of a block, and its rank among that source's slots."""
    q = permute(np.arange(BLOCK), BLOCK, round_keys([self.seed, SALT, stage, block]))
    bounds = np.cumsum(self.counts[stage])
    source = np.searchsorted(bounds, q, side="right")
    return np.stack([source, q - (bounds - self.counts[stage])[source]])  # (2, BLOCK)

  @functools.lru_cache(maxsize=8)
  def _before(self, global_batch: int) -> np.ndarray:
    """(stages, sources): rows each source gave in the stages before each stage."""
    out = np.zeros((len(self.counts), len(self.sources)), np.int64)
    for i in range(1, len(self.counts)):
      length = (self.stage_steps[i] - self.stage_steps[i - 1]) * global_batch
      out[i] = out[i - 1] + self._within(i - 1, length)
    return out

  def _within(self, stage: int, length: int) -> np.ndarray:
    """Rows of each source among the first `length` rows of a stage."""
    blocks, rest = divmod(length, BLOCK)
    partial = np.bincount(self._order(stage, blocks)[0, :rest], minlength=len(self.sources))
    return blocks * self.counts[stage] + partial

  def locate(self, start: int, count: int, global_batch: int) -> tuple[np.ndarray, np.ndarray]:
    """(source, that source's row index) of row positions [start, start + count)."""
    positions = np.arange(start, start + count, dtype=np.int64)
    first = np.asarray(self.stage_steps, np.int64) * global_batch
    stage = np.searchsorted(first, positions, side="right") - 1
    block, slot = np.divmod(positions - first[stage], BLOCK)
    source, index = np.empty(count, np.int64), np.empty(count, np.int64)
    for i, b in {(int(i), int(b)) for i, b in zip(stage, block)}:
      sel = (stage == i) & (block == b)
      src, rank = self._order(i, b)[:, slot[sel]]
      source[sel] = src
      index[sel] = self._before(global_batch)[i, src] + b * self.counts[i][src] + rank
    return source, index

  def consumed(self, steps: int, global_batch: int) -> np.ndarray:
    """Rows each source gave to the batches of the first `steps` steps."""
    end = steps * global_batch
    i = int(np.searchsorted(self.stage_steps, steps, side="right")) - 1
    return self._before(global_batch)[i] + self._within(i, end - self.stage_steps[i] * global_batch)

  def batch(self, step: int, global_batch: int, process_index: int = 0,
            process_count: int = 1) -> Batch:
    """This process's rows of the global batch of `step`."""
    if global_batch % process_count:
      raise UserError(f"batch size {global_batch} is not divisible by {process_count} processes")
    per = global_batch // process_count
    source, index = self.locate(step * global_batch + process_index * per, per, global_batch)
    out: Batch | None = None
    for j in np.unique(source):
      sel = source == j
      ds = self.sources[j]
      rows = ds.rows(ds.window_ids_at(index[sel]))
      if out is None:
        out = {k: np.zeros((per, *v.shape[1:]), v.dtype) for k, v in rows.items()}
      for k, v in rows.items():
        out[k][sel] = v
    return out

  def eval_batch(self, *args, **kwargs) -> Batch:
    raise NotImplementedError("a mixture's held-out data is the run's eval dataset")

  def num_windows(self) -> np.ndarray:
    return np.array([ds.num_windows for ds in self.sources], np.int64)

  def loop_hooks(self, run: Any) -> list[Any]:
    """The training loop's hooks for this data: per-source evaluation, usage, exhaustion."""
    return [MixtureHook(self)]



def _due(step: int, every: int, last: int) -> bool:
  return bool(every and step % every == 0) or step == last


class MixtureHook:
  """A training-loop hook (`lmjax.loop.Hook`'s methods): each source's eval metrics at
  every evaluation, the sources' use at every log step (`data/<source>/share`, `epochs`,
  `wraps`), and with `mixture_exhausted=stop`, a stop before a source would be reread."""

  def __init__(self, data: MixtureDataset):
    self.data, self.wraps = data, np.zeros(len(data.sources), np.int64)

  def start(self, ctx: Any, step: int) -> None:
    self.batch = ctx.run.exp.train.batch_size
    self.wraps = self._wraps(step)
    if self._exhausted(step + 1):
      raise UserError(f"data.mixture source(s) {', '.join(self._exhausted(step + 1))} would be "
                      f"read past their end at step {step + 1} (data.mixture_exhausted=stop)")

  def before_step(self, step: int) -> None:
    pass

  def after_step(self, ctx: Any, step: int, state: Any, metrics: Any) -> str | None:
    t, writer = ctx.run.exp.train, ctx.run.writer
    if _due(step, t.eval_every, t.steps) and self.data.evals:
      for name, data in self.data.evals.items():
        writer.write(step, f"eval/{name}", ctx.evaluate_on(state.params, data), t.steps)
      ctx.speed.restart(step)  # keep evaluation out of the training rate
    if _due(step, t.log_every, t.steps):
      writer.write(step, "data", self.usage(step), t.steps)
    stop = self._exhausted(step + 1) if step < t.steps else []
    return f"data.mixture source(s) {', '.join(stop)} exhausted" if stop else None

  def end(self) -> None:
    pass

  def usage(self, step: int) -> dict[str, float]:
    """Each source's share of the rows so far, passes over it, and wraps (logged anew)."""
    used = self.data.consumed(step, self.batch)
    wraps = self._wraps(step)
    for j in np.flatnonzero(wraps > self.wraps):
      logging.warning("data.mixture source %s wrapped: pass %d over it began by step %d",
                      self.data.names[j], wraps[j] + 1, step)
    self.wraps = wraps
    out = {}
    for j, name in enumerate(self.data.names):
      out[f"{name}/share"] = used[j] / max(used.sum(), 1)
      out[f"{name}/epochs"] = used[j] / self.data.sources[j].num_windows
      out[f"{name}/wraps"] = float(wraps[j])
    return out

  def _wraps(self, step: int) -> np.ndarray:
    used = self.data.consumed(step, self.batch)
    return np.maximum(-(-used // self.data.num_windows()) - 1, 0)

  def _exhausted(self, steps: int) -> list[str]:
    if self.data.exhausted != "stop":
      return []
    over = self.data.consumed(steps, self.batch) > self.data.num_windows()
    return [self.data.names[j] for j in np.flatnonzero(over)]


class InterleavedEval:
  """The sources' held-out windows taken in turn, one of each (a source that runs out drops
  out): the overall eval set of a mixture, so that a fixed prefix of it (`train.eval_batches`)
  holds every source, not only the first."""

  def __init__(self, sources: Sequence[PackedDataset]):
    self.sources = list(sources)
    keys = [(k, j) for j, ds in enumerate(self.sources) for k in range(ds.num_windows)]
    order = sorted(range(len(keys)), key=keys.__getitem__)
    self.source = np.array([keys[i][1] for i in order], np.int64)
    self.window = np.array([keys[i][0] for i in order], np.int64)
    self.num_windows = len(order)

  def eval_batch(self, index: int, global_batch: int, process_index: int = 0,
                 process_count: int = 1) -> Batch:
    """Batch `index` of the fixed pass; rows past the end are padding."""
    per = global_batch // process_count
    ids = np.arange(index * global_batch + process_index * per,
                    index * global_batch + (process_index + 1) * per)
    valid = ids < self.num_windows
    source = np.where(valid, self.source[np.minimum(ids, self.num_windows - 1)], -1)
    out = self.sources[0].rows(np.full(per, -1))  # all padding, then each source's rows
    for j in np.unique(source[valid]):
      sel = source == j
      rows = self.sources[j].rows(self.window[np.minimum(ids, self.num_windows - 1)][sel])
      for k, v in rows.items():
        out[k][sel] = v
    return out

  def num_eval_batches(self, global_batch: int) -> int:
    return -(-self.num_windows // global_batch)
