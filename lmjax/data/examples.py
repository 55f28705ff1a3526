"""Labelled examples for fine-tuning: the `task` section that names their files, the
classification and regression records of a text or a text pair (GLUE-style), and
`ExampleDataset`, their batches as a function of (seed, step). Extractive QA's windows
are in `lmjax.data.squad`, conversations in `lmjax.data.chat`.

Files are JSON lines: {"text": ..., "label": ...}, with an optional "text_pair",
for classification (label a name from the config's label list, or its index)
and regression (label a number); {"question": ..., "context": ..., "answer":
...} for QA (the answer must occur in the context). Sequences are framed as the
model was pretrained: [CLS] a [SEP] b [SEP] with token types 0/1 for encoders,
[BOS] a [EOS] b [EOS] for decoders; QA puts the question first and the context
second.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import numpy as np

from lmjax.data.jsonl import read_json_lines
from lmjax.data.permutation import epoch_order
from lmjax.errors import UserError

DATASETS = ("shakespeare_genre",)  # built in: no files needed


@dataclasses.dataclass(frozen=True)
class TaskConfig:
  """The `task` section: the labelled examples a fine-tuning objective reads (chat
  conversations, preference pairs, labelled texts, QA files). How it trains on them is
  the objective's (`objective.*`); the row length is `data.seq_len`."""

  dataset: str = ""  # a built-in dataset (DATASETS), else train_file / eval_file
  train_file: str = ""  # JSON lines (this module's docstring, lmjax/data/chat.py, squad.py)
  eval_file: str = ""
  labels: tuple[str, ...] = ()  # class names (classification)

  def __post_init__(self):
    if self.dataset not in ("",) + DATASETS:
      raise ValueError(f"task.dataset {self.dataset!r} is unknown (known: "
                       f"{', '.join(DATASETS)})")


def _records(path: str, fields: Sequence[str]) -> list[dict[str, Any]]:
  out = []
  for where, record in read_json_lines(path, "task"):
    if any(k not in record for k in fields):
      raise UserError(f"{where}: expected a JSON object with {', '.join(fields)}")
    out.append(record)
  return out


Example = tuple[str, "str | None", "int | float"]  # (text, text_pair or None, label)


def read_labelled(path: str, labels: Sequence[str], regression: bool = False
                  ) -> list[Example]:
  """(text, text_pair, label) of a classification (label index) or regression file."""
  out = []
  for r in _records(path, ("text", "label")):
    label, pair = r["label"], r.get("text_pair")
    if pair is not None and not isinstance(pair, str):
      raise UserError(f"{path}: text_pair {pair!r} is not a string")
    if regression:
      if not isinstance(label, (int, float)) or isinstance(label, bool):
        raise UserError(f"{path}: label {label!r} is not a number (a regression task)")
      out.append((r["text"], pair, float(label)))
      continue
    if isinstance(label, str) and label in labels:
      label = list(labels).index(label)
    if not isinstance(label, int) or not 0 <= label < len(labels):
      raise UserError(f"{path}: label {r['label']!r} is not one of {list(labels)}")
    out.append((r["text"], pair, label))
  return out


def _frame(tokenizer: Any, family: str) -> tuple[int, int, int]:
  """(begin, separator, end): [CLS] [SEP] [SEP] for encoders; decoders end each part with
  the end of text they were pretrained on."""
  sp = tokenizer.special
  if family == "encoder":
    return sp.cls, sp.sep, sp.sep
  return sp.bos, sp.eos, sp.eos


def _pack(rows: list[list[int]], seq_len: int, pad: int) -> tuple[np.ndarray, np.ndarray]:
  tokens = np.full((len(rows), seq_len), pad, np.int32)
  segments = np.zeros((len(rows), seq_len), np.int32)
  for i, row in enumerate(rows):
    tokens[i, :len(row)], segments[i, :len(row)] = row, 1
  return tokens, segments


def encode_labelled(tokenizer: Any, examples: list[Example], seq_len: int, family: str,
                    regression: bool = False) -> dict[str, np.ndarray]:
  """Rows framed as the model was pretrained; a pair is cut longest-first to fit."""
  begin, sep, end = _frame(tokenizer, family)
  firsts = tokenizer.encode([text for text, _, _ in examples])
  pairs = [p for _, p, _ in examples if p is not None]
  seconds = iter(tokenizer.encode(pairs)) if pairs else iter(())
  rows, types = [], []
  for (_, pair, _), a in zip(examples, firsts):
    if pair is None:
      rows.append([begin, *a[:seq_len - 2], end])
      types.append([0] * len(rows[-1]))
      continue
    b = next(seconds)
    while len(a) + len(b) > seq_len - 3:  # longest first, as BERT's GLUE runs did
      a, b = (a[:-1], b) if len(a) >= len(b) else (a, b[:-1])
    rows.append([begin, *a, sep, *b, end])
    types.append([0] * (len(a) + 2) + [1] * (len(b) + 1))
  tokens, segments = _pack(rows, seq_len, tokenizer.special.pad)
  token_types, _ = _pack(types, seq_len, 0)
  dtype = np.float32 if regression else np.int32
  return {"tokens": tokens, "segment_ids": segments, "token_types": token_types,
          "labels": np.asarray([label for _, _, label in examples], dtype)}


class ExampleDataset:
  """Examples as batches of a pure function of (seed, step), like PackedDataset's windows:
  each epoch a keyed permutation of the examples (the same order function); eval batches
  in order, padded with weight-0 rows."""

  def __init__(self, arrays: dict[str, np.ndarray], seed: int):
    self.arrays, self.seed = arrays, seed
    self.num_examples = len(next(iter(arrays.values())))

  def _rows(self, ids: np.ndarray) -> dict[str, np.ndarray]:
    valid = ids >= 0
    out = {k: v[np.where(valid, ids, 0)] for k, v in self.arrays.items()}
    out["weights"] = valid.astype(np.float32)
    return out

  def batch(self, step: int, global_batch: int, process_index: int = 0,
            process_count: int = 1) -> dict[str, np.ndarray]:
    per = global_batch // process_count
    start = step * global_batch + process_index * per
    return self._rows(epoch_order(start, per, self.num_examples, self.seed))

  def eval_batch(self, index: int, global_batch: int, process_index: int = 0,
                 process_count: int = 1) -> dict[str, np.ndarray]:
    per = global_batch // process_count
    ids = np.arange(index * global_batch + process_index * per,
                    index * global_batch + (process_index + 1) * per)
    return self._rows(np.where(ids < self.num_examples, ids, -1))

  def num_eval_batches(self, global_batch: int) -> int:
    return -(-self.num_examples // global_batch)
