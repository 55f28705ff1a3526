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
import re
import string
from typing import Iterator, Mapping, Sequence

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
  with open(path, encoding="utf-8-sig") as f:
    head = f.read(1 << 16).lstrip()
  records = _squad_json(path) if head.startswith("{") and '"data"' in head.split("\n")[0] \
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


def _squad_json(path: str) -> Iterator[tuple[str, QAExample]]:
  try:
    with open(path, encoding="utf-8-sig") as f:
      data = json.load(f)["data"]
  except (json.JSONDecodeError, KeyError, TypeError) as e:
    raise UserError(f"{path}: not SQuAD JSON ({type(e).__name__}: {e})") from None
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


def _json_lines(path: str) -> Iterator[tuple[str, QAExample]]:
  from lmjax.data.chat import json_lines
  for where, r in json_lines(path):
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
