"""Raw text in, a cached token stream out.

A corpus is a list of `.txt` files (documents separated by blank lines) or
`.jsonl` files (one document per line in a `text` field). It is tokenized once
into `CACHE_DIR/<key>/` (tokens.npy, doc_starts.npy), keyed by the files'
contents, the tokenizer's sha256 and the delimiter ids, and memory-mapped by
every later run.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
from typing import Iterator, Sequence

import numpy as np
from absl import logging

from lmjax.data.tokenizer import Tokenizer, file_sha256
from lmjax.errors import UserError

BUNDLED_DIR = os.path.join(os.path.dirname(os.path.dirname(__file__)), "assets", "shakespeare")
def bundled_corpus() -> dict[str, object]:
  """Data config entries for the bundled Shakespeare slice and its 2,048-piece tokenizer."""
  return {"train_files": (os.path.join(BUNDLED_DIR, "train.txt"),),
          "eval_files": (os.path.join(BUNDLED_DIR, "valid.txt"),),
          "tokenizer": os.path.join(BUNDLED_DIR, "tokenizer.model")}


CACHE_FORMAT = 1  # bump when the cache layout changes
_ENCODE_CHUNK = 4096  # documents per tokenizer call: bounds memory on large corpora


@dataclasses.dataclass(frozen=True)
class TokenStream:
  """All documents back to back, each as [begin] tokens [end]."""

  tokens: np.ndarray  # (N,) uint16 or int32, usually memory-mapped
  doc_starts: np.ndarray  # (num_docs,) int64 offset of each document in `tokens`


def check_files(paths: Sequence[str], what: str) -> None:
  """Fails early, with one line, on files that are missing, empty or of unknown type."""
  if not paths:
    raise UserError(f"no {what} files given (set --config.data.{what}_files)")
  for path in paths:
    if os.path.isdir(path):
      raise UserError(f"{what} file {path} is a directory; list the files in it")
    if not os.path.isfile(path):
      raise UserError(f"{what} file not found: {path}")
    if not path.endswith((".txt", ".jsonl")):
      raise UserError(f"{what} file {path} must end in .txt or .jsonl")
    if os.path.getsize(path) == 0:
      raise UserError(f"{what} file is empty: {path}")
    if not os.access(path, os.R_OK):
      raise UserError(f"{what} file is not readable: {path}")


# A longer line is a broken or binary file, not text; reading stops before it fills memory.
MAX_LINE_BYTES = 16 << 20


def _lines(path: str, bad_utf8: str) -> Iterator[tuple[int, str]]:
  """(line number, text) of a file; invalid UTF-8 fails or is skipped and counted."""
  skipped = 0
  with open(path, "rb") as f:
    for lineno, raw in enumerate(iter(lambda: f.readline(MAX_LINE_BYTES + 1), b""), 1):
      if len(raw) > MAX_LINE_BYTES:
        raise UserError(f"{path}:{lineno}: line longer than {MAX_LINE_BYTES >> 20} MiB; is "
                        "this a text file? Split long documents into lines")
      try:
        yield lineno, raw.decode("utf-8")
      except UnicodeDecodeError as e:
        if bad_utf8 != "skip":
          raise UserError(f"{path}:{lineno}: invalid UTF-8 (byte {e.start}); fix the file or "
                          "set data.bad_utf8=skip") from None
        skipped += 1
  if skipped:
    logging.warning("%s: skipped %d lines of invalid UTF-8", path, skipped)


def read_documents(path: str, bad_utf8: str = "fail") -> Iterator[str]:
  """Documents of one .txt (blank-line separated) or .jsonl (`text` field) file."""
  if path.endswith(".jsonl"):
    for lineno, line in _lines(path, bad_utf8):
      if not line.strip():
        continue
      try:
        text = json.loads(line)["text"]
      except (json.JSONDecodeError, KeyError, TypeError):
        raise UserError(f"{path}:{lineno}: expected a JSON object with a 'text' field") from None
      if not isinstance(text, str):
        raise UserError(f"{path}:{lineno}: the 'text' field must be a string")
      if text.strip():
        yield text
    return
  doc: list[str] = []
  for _, line in _lines(path, bad_utf8):
    if line.strip():
      doc.append(line.rstrip("\r\n"))
    elif doc:
      yield "\n".join(doc)
      doc = []
  if doc:
    yield "\n".join(doc)


def _cache_key(paths: Sequence[str], tokenizer: Tokenizer, begin: int, end: int,
               bad_utf8: str) -> str:
  digest = hashlib.sha256(f"{CACHE_FORMAT}:{tokenizer.sha256}:{begin}:{end}:{bad_utf8}".encode())
  for path in paths:
    digest.update(file_sha256(path).encode())
  return digest.hexdigest()[:24]


def _tokenize(paths: Sequence[str], tokenizer: Tokenizer, begin: int, end: int, bad_utf8: str):
  dtype = np.uint16 if tokenizer.vocab_size <= np.iinfo(np.uint16).max else np.int32
  pieces, starts, offset = [], [], 0
  for path in paths:
    docs = list(read_documents(path, bad_utf8))
    for i in range(0, len(docs), _ENCODE_CHUNK):
      for ids in tokenizer.encode(docs[i:i + _ENCODE_CHUNK]):
        starts.append(offset)
        pieces.append(np.asarray([begin, *ids, end], dtype=dtype))
        offset += len(ids) + 2
  if not pieces:
    raise UserError(f"no documents found in {', '.join(paths)}")
  return np.concatenate(pieces), np.asarray(starts, dtype=np.int64)


def load_token_stream(paths: Sequence[str], tokenizer: Tokenizer, cache_dir: str,
                      begin: int, end: int, bad_utf8: str = "fail") -> TokenStream:
  """Tokenizes `paths` once (atomic write into the cache) and memory-maps the result."""
  key = _cache_key(paths, tokenizer, begin, end, bad_utf8)
  entry = os.path.join(os.path.expanduser(cache_dir), key)
  if not os.path.isfile(os.path.join(entry, "meta.json")):
    tokens, starts = _tokenize(paths, tokenizer, begin, end, bad_utf8)
    os.makedirs(os.path.dirname(entry), exist_ok=True)
    tmp = tempfile.mkdtemp(dir=os.path.dirname(entry), prefix=f".{key}.")
    np.save(os.path.join(tmp, "tokens.npy"), tokens)
    np.save(os.path.join(tmp, "doc_starts.npy"), starts)
    with open(os.path.join(tmp, "meta.json"), "w") as f:
      json.dump({"files": list(paths), "tokenizer_sha256": tokenizer.sha256,
                 "num_tokens": int(tokens.size), "num_docs": int(starts.size)}, f)
    try:
      os.rename(tmp, entry)
    except OSError:  # another process finished the same entry first
      shutil.rmtree(tmp, ignore_errors=True)
    logging.info("tokenized %d documents, %d tokens into %s", starts.size, tokens.size, entry)
  return TokenStream(tokens=np.load(os.path.join(entry, "tokens.npy"), mmap_mode="r"),
                     doc_starts=np.load(os.path.join(entry, "doc_starts.npy")))
