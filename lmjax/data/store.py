"""The token store: a prepared corpus that every host reads without tokenizing.

    STORE/index.json              inputs (size, sha256), tokenizer sha256, begin/end ids,
                                  and per shard its token and document counts and checksums
    STORE/shards/NAME.tokens      token ids, little-endian uint16 (uint32 past 65,535 pieces)
    STORE/shards/NAME.docs        int64 offset of each document in the shard
    STORE/shards/NAME.json        the shard's record, written last: its completion mark

Each document is [begin] ids [end]; a shard holds whole documents of one part of
one input, in input order. The store's token stream is its shards back to back;
a global offset maps to (shard, offset) through a cumulative table of shard
sizes. Shards on disk are memory-mapped; shards in a bucket are read by byte
ranges through a bounded block cache (`lmjax.paths.RangeFile`). Either way a
reader's memory does not grow with the corpus. `python -m launch.prepare_data`
writes stores (`lmjax/data/prepare.py`).
"""

from __future__ import annotations

import bisect
import dataclasses
import json
import os
from typing import Any, Protocol, Sequence

import numpy as np

from lmjax import paths
from lmjax.errors import UserError

FORMAT = "lmjax.token_store"
VERSION = 1
INDEX = "index.json"
SHARDS = "shards"


def is_store(path: str) -> bool:
  return paths.isfile(paths.join(path, INDEX))


def token_dtype(vocab_size: int) -> np.dtype:
  return np.dtype("<u2") if vocab_size <= 1 << 16 else np.dtype("<u4")


class Shard(Protocol):
  """Random access to one run of whole documents."""

  num_tokens: int

  def tokens(self, lo: int, hi: int) -> np.ndarray:
    """Token ids at offsets [lo, hi)."""

  def starts_in(self, lo: int, hi: int) -> np.ndarray:
    """Offsets d of document starts with lo <= d < hi."""


@dataclasses.dataclass(frozen=True)
class TokenStream:
  """Documents held in memory (or memory-mapped): a shard of its own."""

  tokens_array: np.ndarray  # (N,) token ids
  doc_starts: np.ndarray  # (num_docs,) int64, ascending, starting at 0

  @property
  def num_tokens(self) -> int:
    return int(self.tokens_array.size)

  def tokens(self, lo: int, hi: int) -> np.ndarray:
    return self.tokens_array[lo:hi]

  def starts_in(self, lo: int, hi: int) -> np.ndarray:
    i, j = np.searchsorted(self.doc_starts, [lo, hi], side="left")
    return np.asarray(self.doc_starts[i:j])


def _spans(shards: Sequence[Shard], cum: np.ndarray, start: int, length: int):
  """(shard index, lo, hi) pieces of the stream's offsets [start, start + length)."""
  s = int(np.searchsorted(cum, start, side="right")) - 1
  done = 0
  while done < length:
    lo = start + done - int(cum[s])
    hi = min(shards[s].num_tokens, lo + length - done)
    if hi > lo:
      yield s, lo, hi
      done += hi - lo
    s += 1


class TokenSource:
  """Shards back to back: windows of the whole stream, read without loading it."""

  def __init__(self, shards: Sequence[Shard]):
    self.shards = list(shards)
    self.cum = np.cumsum([0] + [s.num_tokens for s in self.shards], dtype=np.int64)  # (S+1,)
    self._remote = any(hasattr(s, "prefetch") for s in self.shards)

  @property
  def num_tokens(self) -> int:
    return int(self.cum[-1])

  def window(self, start: int, length: int, tokens: np.ndarray, is_start: np.ndarray) -> None:
    """Fills `tokens` (length,) and `is_start` (length,), True where a document begins,
    with the stream's offsets [start, start + length)."""
    done = 0
    for s, lo, hi in _spans(self.shards, self.cum, start, length):
      tokens[done:done + hi - lo] = self.shards[s].tokens(lo, hi)
      is_start[done + self.shards[s].starts_in(lo, hi) - lo] = True
      done += hi - lo

  def prefetch(self, starts: Sequence[int], length: int) -> None:
    """Lets shards in a bucket fetch the token ranges of many windows at once."""
    if not self._remote:
      return
    wanted: dict[int, list[tuple[int, int]]] = {}
    for start in starts:
      for s, lo, hi in _spans(self.shards, self.cum, int(start), length):
        wanted.setdefault(s, []).append((lo, hi))
    for s, spans in wanted.items():
      fetch = getattr(self.shards[s], "prefetch", None)
      if fetch is not None:
        fetch(spans)


class _MappedShard:
  """A shard of a store on disk, memory-mapped on first use."""

  def __init__(self, folder: str, record: dict[str, Any], dtype: np.dtype):
    self.name, self.num_tokens, self.num_docs = record["name"], record["tokens"], record["docs"]
    self._paths = [os.path.join(folder, f"{self.name}.{k}") for k in ("tokens", "docs")]
    for path, size in zip(self._paths, (self.num_tokens * dtype.itemsize, self.num_docs * 8)):
      _check_size(path, os.path.getsize(path) if os.path.isfile(path) else -1, size)
    self._dtype = dtype
    self._tokens = self._docs = None

  def tokens(self, lo: int, hi: int) -> np.ndarray:
    if self._tokens is None:
      self._tokens = np.memmap(self._paths[0], dtype=self._dtype, mode="r")
    return self._tokens[lo:hi]

  def starts_in(self, lo: int, hi: int) -> np.ndarray:
    if self._docs is None:
      self._docs = np.memmap(self._paths[1], dtype="<i8", mode="r")
    i, j = np.searchsorted(self._docs, [lo, hi], side="left")
    return np.asarray(self._docs[i:j])


class _RemoteShard:
  """A shard in a bucket, read by byte ranges (`paths.RangeFile`): tokens by the spans a
  batch needs, document starts by binary search over cached blocks of the .docs file."""

  def __init__(self, folder: str, record: dict[str, Any], dtype: np.dtype,
               sizes: dict[str, int]):
    self.name, self.num_tokens, self.num_docs = record["name"], record["tokens"], record["docs"]
    urls = [paths.join(folder, f"{self.name}.{k}") for k in ("tokens", "docs")]
    for url, size in zip(urls, (self.num_tokens * dtype.itemsize, self.num_docs * 8)):
      _check_size(url, sizes.get(url.rpartition("/")[2], -1), size)
    self._dtype = dtype
    self._tokens = paths.RangeFile(urls[0], self.num_tokens * dtype.itemsize)
    self._docs = paths.RangeFile(urls[1], self.num_docs * 8)

  def prefetch(self, spans: Sequence[tuple[int, int]]) -> None:
    item = self._dtype.itemsize
    self._tokens.prefetch([(lo * item, hi * item) for lo, hi in spans])

  def tokens(self, lo: int, hi: int) -> np.ndarray:
    item = self._dtype.itemsize
    return np.frombuffer(self._tokens.read(lo * item, hi * item), self._dtype)

  def _doc(self, k: int) -> int:
    return int(np.frombuffer(self._docs.read(8 * k, 8 * k + 8), "<i8")[0])

  def starts_in(self, lo: int, hi: int) -> np.ndarray:
    i = bisect.bisect_left(range(self.num_docs), lo, key=self._doc)
    j = bisect.bisect_left(range(i, self.num_docs), hi, key=self._doc) + i
    return np.frombuffer(self._docs.read(8 * i, 8 * j), "<i8")


def _check_size(path: str, actual: int, size: int) -> None:
  if actual != size:
    state = "missing" if actual < 0 else f"{actual} bytes, the index says {size}"
    raise UserError(f"token store shard {path} is {state}; run launch.prepare_data on the "
                    "same inputs again to repair the store")


@dataclasses.dataclass
class TokenStore:
  """An opened store: its index and its shards."""

  path: str
  index: dict[str, Any]
  shards: list[Shard]

  @classmethod
  def open(cls, path: str) -> "TokenStore":
    try:
      index = json.loads(paths.read_bytes(paths.join(path, INDEX)))
    except (OSError, json.JSONDecodeError) as e:
      raise UserError(f"{path} is not a readable token store ({e}); prepare it with "
                      "`python -m launch.prepare_data`") from None
    except UserError:
      raise
    except Exception as e:  # a bucket's errors (credentials, names) have no common base
      raise UserError(paths.describe(path, e)) from None
    if index.get("format") != FORMAT or index.get("version") != VERSION:
      raise UserError(f"{path}: token store format {index.get('format')} "
                      f"v{index.get('version')} is not {FORMAT} v{VERSION}; prepare it again")
    dtype = np.dtype(index["dtype"])
    folder = paths.join(path, SHARDS)
    if not paths.is_remote(path):
      return cls(path, index, [_MappedShard(folder, r, dtype) for r in index["shards"]])
    fs, prefix = paths.filesystem(folder)  # every shard's size from one listing
    sizes = {k.rpartition("/")[2]: int(v["size"]) for k, v in fs.find(prefix, detail=True).items()}
    return cls(path, index, [_RemoteShard(folder, r, dtype, sizes) for r in index["shards"]])

  def check(self, tokenizer_sha256: str, begin: int, end: int, objective: str) -> None:
    """Refuses a store of another tokenizer or other document delimiters than the run's."""
    ix = self.index
    if ix["tokenizer_sha256"] != tokenizer_sha256:
      raise UserError(f"token store {self.path} was prepared with another tokenizer (sha256 "
                      f"{ix['tokenizer_sha256'][:12]}, the run's is {tokenizer_sha256[:12]}); "
                      "prepare it again with data.tokenizer")
    if (ix["begin_id"], ix["end_id"]) != (begin, end):
      raise UserError(f"token store {self.path} frames documents with ids "
                      f"{ix['begin_id']}/{ix['end_id']}, a {objective} run needs {begin}/{end}; "
                      f"prepare it again with --objective {objective}")
