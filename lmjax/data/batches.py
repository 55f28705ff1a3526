"""Fixed-length packed rows, and the batch of a step as a pure function of (seed, step).

The token stream is cut into non-overlapping windows of `seq_len` tokens. Epoch
e visits the windows in the order of a keyed permutation of (seed, e), computed
for just the windows a batch needs (`permutation.permute`), so nothing the size
of the corpus is ever materialised; the global batch of step s is positions
[s*B, (s+1)*B) of that endless sequence. No iterator state exists, so a resumed
run sees exactly the batches it would have seen, whatever the number of hosts;
each process reads only its own rows.
"""

from __future__ import annotations

import functools

import numpy as np

from lmjax.data.permutation import epoch_order, permute, round_keys
from lmjax.data.store import Shard, TokenSource
from lmjax.errors import UserError

Batch = dict[str, np.ndarray]  # tokens, segment_ids, positions: (rows, seq_len) int32


class PackedDataset:
  """Random access to packed rows: tokens, segment ids (1.. per document, 0 = pad), positions."""

  def __init__(self, source: TokenSource | Shard, seq_len: int, seed: int, shuffle: bool = True,
               salt: tuple[int, ...] = ()):
    """`salt` keys the epoch order apart from another dataset's of the same seed (a
    mixture's sources); without it the order is the one lmjax has always had."""
    self.source = source if isinstance(source, TokenSource) else TokenSource([source])
    self.seq_len, self.seed, self.shuffle, self.salt = seq_len, seed, shuffle, tuple(salt)
    self.num_windows = self.source.num_tokens // seq_len
    if self.num_windows == 0:
      raise UserError(f"corpus has {self.source.num_tokens} tokens, fewer than one row of "
                      f"seq_len={seq_len}")

  @functools.lru_cache(maxsize=8)
  def _keys(self, epoch: int) -> np.ndarray:
    return round_keys([self.seed, *self.salt, epoch])

  def window_ids(self, start: int, count: int) -> np.ndarray:
    """Window ids at positions [start, start + count) of the endless epoch sequence."""
    if not self.shuffle:
      return np.arange(start, start + count, dtype=np.int64) % self.num_windows
    return epoch_order(start, count, self.num_windows, self.seed, self._keys)

  def window_ids_at(self, positions: np.ndarray) -> np.ndarray:
    """Window ids at any positions of the endless epoch sequence (shuffled datasets)."""
    if not self.shuffle:
      return np.asarray(positions, np.int64) % self.num_windows
    epochs, offsets = np.divmod(np.asarray(positions, np.int64), self.num_windows)
    out = np.empty(len(offsets), np.int64)
    for epoch in np.unique(epochs):
      sel = epochs == epoch
      out[sel] = permute(offsets[sel], self.num_windows, self._keys(int(epoch)))
    return out

  def rows(self, window_ids: np.ndarray) -> Batch:
    """Packs the given windows; ids < 0 give all-padding rows."""
    n, t = len(window_ids), self.seq_len
    tokens = np.zeros((n, t), np.int32)
    is_start = np.zeros((n, t), bool)  # a document begins here
    valid = np.asarray(window_ids) >= 0
    self.source.prefetch(np.asarray(window_ids)[valid] * t, t)  # a bucket's ranges, all at once
    for r in np.flatnonzero(valid):
      self.source.window(int(window_ids[r]) * t, t, tokens[r], is_start[r])
    is_start[:, 0] = True  # a document begun before the window restarts at its edge
    index = np.arange(t)
    segments = np.cumsum(is_start, axis=1, dtype=np.int32)  # (n, T) 1, 2, ... per document
    positions = index - np.maximum.accumulate(np.where(is_start, index, 0), axis=1)
    keep = valid[:, None]
    return {"tokens": tokens,
            "segment_ids": np.where(keep, segments, 0).astype(np.int32),
            "positions": np.where(keep, positions, 0).astype(np.int32)}

  def batch(self, step: int, global_batch: int, process_index: int = 0,
            process_count: int = 1) -> Batch:
    """This process's rows of the global batch of `step`."""
    if global_batch % process_count:
      raise UserError(f"batch size {global_batch} is not divisible by {process_count} processes")
    per = global_batch // process_count
    ids = self.window_ids(step * global_batch + process_index * per, per)
    return self.rows(ids)

  def eval_batch(self, index: int, global_batch: int, process_index: int = 0,
                 process_count: int = 1) -> Batch:
    """Batch `index` of a fixed, unshuffled pass; rows past the end are padding."""
    ids = np.arange(index * global_batch, (index + 1) * global_batch)
    ids = np.where(ids < self.num_windows, ids, -1)
    per = global_batch // process_count
    return self.rows(ids[process_index * per:(process_index + 1) * per])

  def num_eval_batches(self, global_batch: int) -> int:
    return -(-self.num_windows // global_batch)
