"""A keyed bijection on [0, n) computed element by element: the epoch order of windows.

A balanced Feistel network on the smallest even number of bits that covers n is
a permutation of [0, 4^k); cycle walking (apply it again while the value is >=
n) restricts it to [0, n). Any slice of the order costs time proportional to the
slice and no memory proportional to n, so a corpus of 10^10 windows shuffles as
cheaply as one of 10^3. Levanter's data store orders its epochs the same way.
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

_ROUNDS = 6


def _mix(x: np.ndarray) -> np.ndarray:
  """splitmix64's finaliser: a fast, well-spread 64-bit hash (uint64 arithmetic wraps)."""
  x = x ^ (x >> np.uint64(30))
  x = x * np.uint64(0xBF58476D1CE4E5B9)
  x = x ^ (x >> np.uint64(27))
  x = x * np.uint64(0x94D049BB133111EB)
  return x ^ (x >> np.uint64(31))


def round_keys(seed: Sequence[int]) -> np.ndarray:
  """The Feistel round keys of one (seed, epoch, ...) tuple."""
  return np.random.default_rng(list(seed)).integers(0, 2**63, _ROUNDS, dtype=np.uint64)


def _feistel(x: np.ndarray, half_bits: int, keys: np.ndarray) -> np.ndarray:
  mask = np.uint64((1 << half_bits) - 1)
  shift = np.uint64(half_bits)
  left, right = x >> shift, x & mask
  for key in keys:
    left, right = right, left ^ (_mix(right ^ key) & mask)
  return (left << shift) | right


def permute(ids: np.ndarray, n: int, keys: np.ndarray) -> np.ndarray:
  """The images of `ids` (each in [0, n)) under the permutation of [0, n) keyed by `keys`."""
  ids = np.asarray(ids, dtype=np.int64)
  if n <= 1:
    return np.zeros_like(ids)
  half_bits = max(1, (int(n - 1).bit_length() + 1) // 2)
  with np.errstate(over="ignore"):
    out = _feistel(ids.astype(np.uint64), half_bits, keys)
    walking = out >= np.uint64(n)
    while walking.any():  # every cycle holds its start (< n), so this ends
      out[walking] = _feistel(out[walking], half_bits, keys)
      walking = out >= np.uint64(n)
  return out.astype(np.int64)


def epoch_order(start: int, count: int, n: int, seed: int,
                keys: Callable[[int], np.ndarray] | None = None) -> np.ndarray:
  """Items at positions [start, start + count) of the endless sequence that visits [0, n)
  once per epoch, epoch e in the order keyed by (seed, e): every dataset's batches, as a
  pure function of (seed, step). `keys(epoch)` may supply cached round keys."""
  keys = keys or (lambda epoch: round_keys([seed, epoch]))
  epochs, offsets = np.divmod(np.arange(start, start + count, dtype=np.int64), n)
  out = np.empty(count, dtype=np.int64)
  for epoch in np.unique(epochs):
    sel = epochs == epoch
    out[sel] = permute(offsets[sel], n, keys(int(epoch)))
  return out
