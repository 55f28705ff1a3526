"""Reading-comprehension data and measures as SQuAD defines them.

Inputs: SQuAD v1.1 and v2.0 JSON as published (`data[].paragraphs[].qas[]`, several
gold answers, `is_impossible` in v2) and the flat JSON lines of Hugging Face datasets
(`id`, `context`, `question`, `answers: {text: [...], answer_start: [...]}`; an empty
answer list is a question without an answer).

Measures: the official evaluation scripts' rules (v1.1 `evaluate-v1.1.py`, v2.0
`evaluate-v2.0.py`): answers are normalised (lowercase, punctuation and the articles
a/an/the removed, whitespace collapsed); exact match and token F1 take the maximum over
the gold answers; an unanswerable question's gold answer is the empty string; v2
reports the HasAns/NoAns split and, from the no-answer scores, the threshold that
maximises each measure.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import os
import re
import string
from typing import Any, Iterator, Mapping, Sequence

from lmjax.data.jsonl import read_json_lines, strip_bom
from lmjax.errors import UserError


@dataclasses.dataclass(frozen=True)
class QAExample:
  id: str
  question: str
  context: str
  answers: tuple[str, ...]  # gold texts; () for a question without an answer
  starts: tuple[int, ...]  # their character offsets in the context

  @property
  def impossible(self) -> bool:
    return not self.answers


# ----------------------------------------------------------------------------- measures


def normalize_answer(s: str) -> str:
  """Lower text and remove punctuation, articles and extra whitespace (the official rule)."""
  s = s.lower()
  s = "".join(ch for ch in s if ch not in set(string.punctuation))
  s = re.sub(r"\b(a|an|the)\b", " ", s)
  return " ".join(s.split())


def exact(prediction: str, gold: str) -> int:
  return int(normalize_answer(prediction) == normalize_answer(gold))


def f1(prediction: str, gold: str) -> float:
  pred, truth = normalize_answer(prediction).split(), normalize_answer(gold).split()
  if not pred or not truth:  # v2: an empty answer scores 1 only against an empty gold
    return float(pred == truth)
  common = collections.Counter(pred) & collections.Counter(truth)
  same = sum(common.values())
  if same == 0:
    return 0.0
  precision, recall = same / len(pred), same / len(truth)
  return 2 * precision * recall / (precision + recall)


def scores(example: QAExample, prediction: str) -> tuple[float, float]:
  """(exact match, F1) of one prediction, the maximum over the gold answers."""
  golds = [a for a in example.answers if normalize_answer(a)] or [""]
  return (max(exact(prediction, g) for g in golds), max(f1(prediction, g) for g in golds))


def evaluate(examples: Sequence[QAExample], predictions: Mapping[str, str],
             no_answer_probs: Mapping[str, float] | None = None,
             threshold: float = 1.0) -> dict[str, float]:
  """The official measures in percent: exact, f1, total, and with unanswerable questions
  the HasAns/NoAns split; with `no_answer_probs` a prediction whose probability exceeds
  `threshold` counts as "no answer", and best_exact/best_f1 and their thresholds are
  found over the examples' own probabilities (the v2 script's rule)."""
  missing = [e.id for e in examples if e.id not in predictions]
  if missing:
    raise UserError(f"no prediction for {len(missing)} questions, e.g. {missing[0]}")
  raw = {e.id: scores(e, predictions[e.id]) for e in examples}
  final = {}
  for e in examples:
    em, f = raw[e.id]
    if no_answer_probs is not None and no_answer_probs[e.id] > threshold:
      em = f = float(e.impossible)
    final[e.id] = (em, f)
  out = _measures(examples, final)
  if any(e.impossible for e in examples):  # SQuAD 2.0: the split, as its script reports it
    for name, subset in (("HasAns", [e for e in examples if not e.impossible]),
                         ("NoAns", [e for e in examples if e.impossible])):
      if subset:
        out.update({f"{name}_{k}": v for k, v in _measures(subset, final).items()})
  if no_answer_probs is not None:
    for i, name in enumerate(("exact", "f1")):
      best, at = _best_threshold(examples, {k: v[i] for k, v in raw.items()}, predictions,
                                 no_answer_probs)
      out[f"best_{name}"], out[f"best_{name}_thresh"] = best, at
  return out


def _measures(examples: Sequence[QAExample], final: Mapping[str, tuple[float, float]]
              ) -> dict[str, float]:
  n = len(examples)
  return {"exact": 100.0 * sum(final[e.id][0] for e in examples) / n,
          "f1": 100.0 * sum(final[e.id][1] for e in examples) / n, "total": float(n)}


def _best_threshold(examples: Sequence[QAExample], raw: Mapping[str, float],
                    predictions: Mapping[str, str], probs: Mapping[str, float]
                    ) -> tuple[float, float]:
  """The v2 script's `find_best_thresh`: start from answering nothing, then lower the
  threshold past each example in order of its no-answer probability."""
  score = best = float(sum(e.impossible for e in examples))
  at = 0.0
  for e in sorted(examples, key=lambda e: probs[e.id]):
    if e.impossible:
      score += -1 if predictions[e.id] else 0  # it now answers something
    else:
      score += raw[e.id]
    if score > best:
      best, at = score, probs[e.id]
  return 100.0 * best / len(examples), at


# ----------------------------------------------------------------------------- files


def read_examples(path: str) -> list[QAExample]:
  """SQuAD JSON (v1.1 or v2.0) or Hugging Face JSON lines, checked: each gold answer must
  stand at its `answer_start`; v2 questions without answers must say `is_impossible`."""
  whole = _whole_json(path)
  records = _squad_json(path, whole) if isinstance(whole, dict) and "data" in whole \
      else _json_lines(path)
  out = []
  for where, ex in records:
    if not ex.context.strip():
      raise UserError(f"{where}: empty context")
    if not ex.question.strip():
      raise UserError(f"{where}: empty question")
    for text, start in zip(ex.answers, ex.starts):
      if ex.context[start:start + len(text)] != text:
        found = ex.context.find(text)
        hint = f" (it is at {found})" if found >= 0 else " (the context does not contain it)"
        raise UserError(f"{where}: answer_start {start} does not point at {text!r}{hint}")
    out.append(ex)
  if not out:
    raise UserError(f"{path}: no questions")
  return out


def _squad_json(path: str, whole: dict) -> Iterator[tuple[str, QAExample]]:
  data = whole["data"]
  if not isinstance(data, list):
    raise UserError(f"{path}: not SQuAD JSON ('data' must be a list of articles)")
  for article in data:
    for paragraph in article.get("paragraphs", []):
      context = paragraph.get("context", "")
      for qa in paragraph.get("qas", []):
        where = f"{path} (question {qa.get('id', '?')})"
        answers = qa.get("answers", [])
        if not answers and "is_impossible" not in qa:
          raise UserError(f"{where}: no answers and no is_impossible (a SQuAD 2.0 question "
                          "without an answer says is_impossible: true)")
        if qa.get("is_impossible"):
          answers = []
        yield where, QAExample(str(qa["id"]), qa.get("question", ""), context,
                               tuple(a["text"] for a in answers),
                               tuple(int(a["answer_start"]) for a in answers))


def _whole_json(path: str) -> Any:
  """The file as one JSON document (SQuAD's own format), or None when it is not one
  (JSON lines: Hugging Face's .json and .jsonl, read line by line next)."""
  if not os.path.isfile(path):
    raise UserError(f"task file not found: {path}")
  with open(path, "rb") as f:
    data = strip_bom(f.read())
  try:
    return json.loads(data.decode("utf-8"))
  except (UnicodeDecodeError, json.JSONDecodeError):
    return None


def _json_lines(path: str) -> Iterator[tuple[str, QAExample]]:
  for where, r in read_json_lines(path, "task"):
    if isinstance(r.get("answer"), str) and "answers" not in r:  # lmjax's own QA lines
      at = r.get("context", "").find(r["answer"]) if isinstance(r.get("context"), str) else -1
      if at < 0:
        raise UserError(f"{where}: answer {r['answer']!r} does not occur in its context")
      r = {**r, "id": r.get("id", where), "answers": {"text": [r["answer"]],
                                                     "answer_start": [at]}}
    try:
      answers = r["answers"]
      texts, starts = list(answers["text"]), list(answers["answer_start"])
      example = QAExample(str(r["id"]), r["question"], r["context"], tuple(texts),
                          tuple(int(s) for s in starts))
    except (KeyError, TypeError, ValueError):
      raise UserError(f"{where}: expected id, context, question and answers: {{text: [...], "
                      "answer_start: [...]}") from None
    if len(texts) != len(starts):
      raise UserError(f"{where}: {len(texts)} answer texts but {len(starts)} answer_start")
    yield where, example


def write_predictions(path: str, predictions: Mapping[str, str]) -> None:
  """{id: answer text} as the official evaluation scripts read it ("" = no answer)."""
  from lmjax import paths
  paths.write_atomic(path, json.dumps(dict(predictions), indent=2, ensure_ascii=False))


# ----------------------------------------------------------------------------- windows


@dataclasses.dataclass
class Windows:
  """Examples cut into rows of `seq_len` tokens, question first, the context in windows
  that overlap by `doc_stride` tokens (run_qa's features)."""

  arrays: dict[str, Any]  # tokens, segment_ids, token_types (R, T); starts, ends (R,)
  example: list[int]  # per row: the index of its example
  offsets: list[list[tuple[int, int] | None]]  # per row, per token: its characters in the
  # context (None outside the context: question, markers, padding)


def make_windows(examples: Sequence[QAExample], tokenizer: Any, seq_len: int, doc_stride: int,
                 family: str) -> Windows:
  """Every example as one or more rows. A row's target is the first gold answer's first
  and last token where the row holds all of it, else position 0 (the null answer, as
  run_qa points a window without the answer at [CLS])."""
  import numpy as np
  from lmjax.data.examples import _frame
  begin, sep, end = _frame(tokenizer, family)
  rows, types, targets, owner, offsets = [], [], [], [], []
  for i, ex in enumerate(examples):
    head = [begin, *tokenizer.encode_with_offsets(ex.question)[0], sep]
    room = seq_len - len(head) - 1
    if room <= doc_stride:
      raise UserError(f"question {ex.id}: {len(head)} tokens leave {max(room, 0)} of "
                      f"seq_len={seq_len} for the context, not more than "
                      f"objective.doc_stride={doc_stride}; raise seq_len or shorten the question")
    ids, spans = tokenizer.encode_with_offsets(ex.context)
    answer = None if ex.impossible else (ex.starts[0], ex.starts[0] + len(ex.answers[0]))
    lo = 0
    while True:
      hi = min(lo + room, len(ids))
      rows.append([*head, *ids[lo:hi], end])
      types.append([0] * len(head) + [1] * (hi - lo + 1))
      offsets.append([None] * len(head) + list(spans[lo:hi]) + [None])
      owner.append(i)
      targets.append(_target(spans[lo:hi], answer, len(head)))
      if hi >= len(ids):
        break
      lo = hi - doc_stride
  tokens = np.full((len(rows), seq_len), max(tokenizer.special.pad, 0), np.int32)
  segments = np.zeros((len(rows), seq_len), np.int32)
  token_types = np.zeros((len(rows), seq_len), np.int32)
  for r, (row, kind) in enumerate(zip(rows, types)):
    tokens[r, :len(row)], segments[r, :len(row)], token_types[r, :len(row)] = row, 1, kind
  target = np.asarray(targets, np.int32).reshape(-1, 2)
  return Windows({"tokens": tokens, "segment_ids": segments, "token_types": token_types,
                  "starts": target[:, 0], "ends": target[:, 1]}, owner, offsets)


def _target(spans: Sequence[tuple[int, int]], answer: tuple[int, int] | None, shift: int
            ) -> tuple[int, int]:
  if answer is None or not spans or spans[0][0] > answer[0] or spans[-1][1] < answer[1]:
    return 0, 0
  first = next(k for k, (_, e) in enumerate(spans) if e > answer[0])
  last = max(k for k, (s, _) in enumerate(spans) if s < answer[1])
  return shift + first, shift + last


def best_answers(windows: Windows, start_logits: Any, end_logits: Any,
                 examples: Sequence[QAExample], n_best: int = 20, max_answer_tokens: int = 30,
                 null_threshold: float | None = None
                 ) -> tuple[dict[str, str], dict[str, float], dict[str, list]]:
  """run_qa's post-processing: for each example, the best-scored span over all its
  windows with end >= start, at most `max_answer_tokens`, inside the context (start +
  end logit; the top `n_best` starts and ends of each window are tried). With
  `null_threshold` (SQuAD 2.0) the answer is "" when the null score (the lowest
  start + end at position 0 over its windows) beats the best span by more than the
  threshold. Returns (predictions, null score minus best span score, n-best lists)."""
  import numpy as np
  null = {i: float("inf") for i in range(len(examples))}
  found: dict[int, list[tuple[float, str]]] = collections.defaultdict(list)
  for r, i in enumerate(windows.example):
    s, e, spans = np.asarray(start_logits[r]), np.asarray(end_logits[r]), windows.offsets[r]
    null[i] = min(null[i], float(s[0] + e[0]))
    n = len(spans)
    for a in np.argsort(s[:n])[::-1][:n_best]:
      for b in np.argsort(e[:n])[::-1][:n_best]:
        if spans[a] is None or spans[b] is None or b < a or b - a + 1 > max_answer_tokens:
          continue
        found[i].append((float(s[a] + e[b]), examples[i].context[spans[a][0]:spans[b][1]]))
  predictions, odds, nbest = {}, {}, {}
  for i, ex in enumerate(examples):
    ranked = sorted(found[i], key=lambda c: -c[0])[:n_best] or [(float("-inf"), "")]
    best_score, best_text = ranked[0]
    odds[ex.id] = null[i] - best_score
    answer = best_text
    if null_threshold is not None and odds[ex.id] > null_threshold:
      answer = ""
    predictions[ex.id], nbest[ex.id] = answer, [{"text": t, "score": sc} for sc, t in ranked]
  return predictions, odds, nbest
