"""Fixed-length packed rows, and the batch of a step as a pure function of (seed, step).

The token stream is cut into non-overlapping windows of `seq_len` tokens. Epoch
e visits the windows in the order of a permutation seeded by (seed, e); the
global batch of step s is windows [s*B, (s+1)*B) of that endless sequence. No
iterator state exists, so a resumed run sees exactly the batches it would have
seen, whatever the number of hosts; each process materialises only its rows.
"""

from __future__ import annotations

import functools

import numpy as np

from lmjax.data.corpus import TokenStream
from lmjax.errors import UserError

Batch = dict[str, np.ndarray]  # tokens, segment_ids, positions: (rows, seq_len) int32


class PackedDataset:
  """Random access to packed rows: tokens, segment ids (1.. per document, 0 = pad), positions."""

  def __init__(self, stream: TokenStream, seq_len: int, seed: int, shuffle: bool = True):
    self.stream, self.seq_len, self.seed, self.shuffle = stream, seq_len, seed, shuffle
    self.num_windows = int(stream.tokens.size // seq_len)
    if self.num_windows == 0:
      raise UserError(f"corpus has {stream.tokens.size} tokens, fewer than one row of "
                      f"seq_len={seq_len}")

  @functools.lru_cache(maxsize=4)
  def _epoch_order(self, epoch: int) -> np.ndarray:
    if not self.shuffle:
      return np.arange(self.num_windows)
    return np.random.default_rng([self.seed, epoch]).permutation(self.num_windows)

  def window_ids(self, start: int, count: int) -> np.ndarray:
    """Window ids at positions [start, start + count) of the endless epoch sequence."""
    flat = np.arange(start, start + count, dtype=np.int64)
    epochs, offsets = np.divmod(flat, self.num_windows)
    out = np.empty(count, dtype=np.int64)
    for epoch in np.unique(epochs):
      sel = epochs == epoch
      out[sel] = self._epoch_order(int(epoch))[offsets[sel]]
    return out

  def rows(self, window_ids: np.ndarray) -> Batch:
    """Packs the given windows; ids < 0 give all-padding rows."""
    t = self.seq_len
    valid = window_ids >= 0
    starts = np.where(valid, window_ids, 0)[:, None] * t  # (n, 1)
    pos = starts + np.arange(t)  # (n, T) offsets into the stream
    doc = np.searchsorted(self.stream.doc_starts, pos, side="right") - 1  # (n, T)
    doc_start = np.maximum(self.stream.doc_starts[doc], starts)  # clip docs begun earlier
    tokens = np.asarray(self.stream.tokens[pos.ravel()], dtype=np.int32).reshape(pos.shape)
    segments = (doc - doc[:, :1] + 1).astype(np.int32)
    positions = (pos - doc_start).astype(np.int32)
    return {"tokens": np.where(valid[:, None], tokens, 0),
            "segment_ids": np.where(valid[:, None], segments, 0),
            "positions": np.where(valid[:, None], positions, 0)}

  def batch(self, step: int, global_batch: int, process_index: int = 0,
            process_count: int = 1) -> Batch:
    """This process's rows of the global batch of `step`."""
    if global_batch % process_count:
      raise UserError(f"batch size {global_batch} is not divisible by {process_count} processes")
    ids = self.window_ids(step * global_batch, global_batch)
    per = global_batch // process_count
    return self.rows(ids[process_index * per:(process_index + 1) * per])

  def eval_batch(self, index: int, global_batch: int, process_index: int = 0,
                 process_count: int = 1) -> Batch:
    """Batch `index` of a fixed, unshuffled pass; rows past the end are padding."""
    ids = np.arange(index * global_batch, (index + 1) * global_batch)
    ids = np.where(ids < self.num_windows, ids, -1)
    per = global_batch // process_count
    return self.rows(ids[process_index * per:(process_index + 1) * per])

  def num_eval_batches(self, global_batch: int) -> int:
    return -(-self.num_windows // global_batch)
