"""A run's corpus entries (token stores, or text files to prepare into one) as one token source.

`data.train_files` and `data.eval_files` list entries: a token store directory
(from `python -m launch.prepare_data`), or files, directories and globs of text
in any format `lmjax.data.readers` reads. Consecutive text entries are prepared
into a store in `data.cache_dir`, keyed by their contents and the settings, by
the same code as `prepare_data`; later runs open it without tokenizing. Every
store is checked against the run's tokenizer and document delimiters.
"""

from __future__ import annotations

import hashlib
import os
from typing import Sequence

from absl import logging

from lmjax.data import prepare as prepare_lib
from lmjax.data import readers, store
from lmjax.data.readers import read_documents  # noqa: F401  (re-exported)
from lmjax.data.store import TokenSource, TokenStream  # noqa: F401  (re-exported)
from lmjax.data.special import file_sha256
from lmjax.data.tokenizer import Tokenizer
from lmjax.errors import UserError

BUNDLED_DIR = os.path.join(os.path.dirname(os.path.dirname(__file__)), "assets", "shakespeare")


def bundled_corpus() -> dict[str, object]:
  """Data config entries for the bundled Shakespeare slice and its 2,048-piece tokenizer."""
  return {"train_files": (os.path.join(BUNDLED_DIR, "train.txt"),),
          "eval_files": (os.path.join(BUNDLED_DIR, "valid.txt"),),
          "tokenizer": os.path.join(BUNDLED_DIR, "tokenizer.model")}


def check_files(paths: Sequence[str], what: str) -> None:
  """Fails early, with one line, on files that are missing, empty or of unknown type."""
  if not paths:
    raise UserError(f"no {what} files given (set --config.data.{what}_files)")
  for path in paths:
    if os.path.isdir(path):
      raise UserError(f"{what} file {path} is a directory; list the files in it")
    readers.check_file(path, what)


def open_corpus(entries: Sequence[str], tokenizer: Tokenizer, begin: int, end: int,
                objective: str, cache_dir: str, what: str = "train", text_field: str = "text",
                bad_utf8: str = "fail", workers: int = 0) -> TokenSource:
  """The entries' documents, framed [begin] ids [end], back to back."""
  if not entries:
    raise UserError(f"no {what} files given (set --config.data.{what}_files)")
  groups: list[list[str]] = []  # a store directory alone, or a run of text entries
  for entry in entries:
    if store.is_store(entry) or not groups or store.is_store(groups[-1][0]):
      groups.append([entry])
    else:
      groups[-1].append(entry)
  shards: list[store.Shard] = []
  for group in groups:
    path = group[0] if store.is_store(group[0]) else _prepared(
        readers.expand_inputs(group, what), tokenizer, begin, end, cache_dir, text_field,
        bad_utf8, workers)
    opened = store.TokenStore.open(path)
    opened.check(tokenizer.sha256, begin, end, objective)
    shards.extend(opened.shards)
  return TokenSource(shards)


def _prepared(files: list[str], tokenizer: Tokenizer, begin: int, end: int, cache_dir: str,
              text_field: str, bad_utf8: str, workers: int) -> str:
  """The cache entry holding `files` as a store, prepared now if it is not there yet."""
  digest = hashlib.sha256(f"{store.FORMAT}:{store.VERSION}:{tokenizer.sha256}:{begin}:{end}:"
                          f"{text_field}:{bad_utf8}".encode())
  for path in files:
    digest.update(file_sha256(path).encode())
  entry = os.path.join(os.path.expanduser(cache_dir), digest.hexdigest()[:24])
  if not store.is_store(entry):
    summary = prepare_lib.prepare(prepare_lib.PrepareConfig(
        inputs=tuple(files), output=entry, tokenizer=tokenizer.path, begin=begin, end=end,
        text_field=text_field, bad_utf8=bad_utf8, workers=workers), show_progress=False)
    logging.info("prepared %d documents, %d tokens into %s", summary.num_docs,
                 summary.num_tokens, entry)
  return entry
