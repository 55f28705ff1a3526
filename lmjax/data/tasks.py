"""Labelled data for fine-tuning: sequence classification and extractive QA.

Files are JSON lines: {"text": ..., "label": ...} for classification (label a
name from the config's label list, or its index), {"question": ..., "context":
..., "answer": ...} for QA (the answer must occur in the context). Sequences are
framed as the model was pretrained: [CLS] ... [SEP] for encoders, [BOS] ... [EOS]
for decoders; QA puts the question first and the context second.
"""

from __future__ import annotations

import json
from typing import Any, Sequence

import numpy as np

from lmjax.data.corpus import check_files
from lmjax.errors import UserError


def _records(path: str, fields: Sequence[str]) -> list[dict[str, Any]]:
  check_files([path], "task")
  out = []
  with open(path, encoding="utf-8") as f:
    for lineno, line in enumerate(f, 1):
      if not line.strip():
        continue
      try:
        record = json.loads(line)
        missing = [k for k in fields if k not in record]
      except json.JSONDecodeError:
        missing = ["(not JSON)"]
        record = {}
      if missing:
        raise UserError(f"{path}:{lineno}: expected a JSON object with {', '.join(fields)}")
      out.append(record)
  return out


def read_classification(path: str, labels: Sequence[str]) -> list[tuple[str, int]]:
  out = []
  for r in _records(path, ("text", "label")):
    label = r["label"]
    if isinstance(label, str) and label in labels:
      label = list(labels).index(label)
    if not isinstance(label, int) or not 0 <= label < len(labels):
      raise UserError(f"{path}: label {r['label']!r} is not one of {list(labels)}")
    out.append((r["text"], label))
  return out


def read_qa(path: str) -> list[tuple[str, str, str]]:
  out = []
  for r in _records(path, ("question", "context", "answer")):
    if r["answer"] not in r["context"]:
      raise UserError(f"{path}: answer {r['answer']!r} does not occur in its context")
    out.append((r["question"], r["context"], r["answer"]))
  return out


def _frame(tokenizer: Any, family: str) -> tuple[int, int, int]:
  sp = tokenizer.special
  if family == "encoder":
    return sp.cls, sp.sep, sp.sep
  return sp.bos, (sp.sep if sp.sep >= 0 else sp.eos), sp.eos


def _pack(rows: list[list[int]], seq_len: int, pad: int) -> tuple[np.ndarray, np.ndarray]:
  tokens = np.full((len(rows), seq_len), pad, np.int32)
  segments = np.zeros((len(rows), seq_len), np.int32)
  for i, row in enumerate(rows):
    tokens[i, :len(row)], segments[i, :len(row)] = row, 1
  return tokens, segments


def encode_classification(tokenizer: Any, examples: list[tuple[str, int]], seq_len: int,
                          family: str) -> dict[str, np.ndarray]:
  begin, _, end = _frame(tokenizer, family)
  ids = tokenizer.encode([text for text, _ in examples])
  rows = [[begin, *x[:seq_len - 2], end] for x in ids]
  tokens, segments = _pack(rows, seq_len, tokenizer.special.pad)
  return {"tokens": tokens, "segment_ids": segments, "token_types": np.zeros_like(tokens),
          "labels": np.asarray([label for _, label in examples], np.int32)}


def encode_qa(tokenizer: Any, examples: list[tuple[str, str, str]], seq_len: int,
              family: str) -> dict[str, np.ndarray]:
  """Token rows with the answer's [start, end] token positions; examples whose answer is
  cut off by `seq_len` are dropped."""
  begin, sep, end = _frame(tokenizer, family)
  rows, types, spans = [], [], []
  for question, context, answer in examples:
    before, after = context.split(answer, 1)
    q, a = tokenizer.encode([question])[0], tokenizer.encode([answer])[0]
    pre = tokenizer.encode([before])[0] if before.strip() else []
    post = tokenizer.encode([after])[0] if after.strip() else []
    head = [begin, *q, sep]
    row = [*head, *pre, *a, *post][:seq_len - 1] + [end]
    start = len(head) + len(pre)
    if start + len(a) > len(row) - 1:
      continue
    rows.append(row)
    types.append([0] * len(head) + [1] * (len(row) - len(head)))
    spans.append((start, start + len(a) - 1))
  if not rows:
    raise UserError(f"no QA example fits seq_len={seq_len}")
  tokens, segments = _pack(rows, seq_len, tokenizer.special.pad)
  token_types, _ = _pack(types, seq_len, 0)
  spans_arr = np.asarray(spans, np.int32)
  return {"tokens": tokens, "segment_ids": segments, "token_types": token_types,
          "starts": spans_arr[:, 0], "ends": spans_arr[:, 1]}
