"""Writes the bundled reading-comprehension set (SQuAD 2.0 JSON) from the bundled corpus:

  python experiments/data/make_qa.py   # rewrites experiments/data/qa_{train,eval}.json

Each context is a passage of a play (5 lines: often longer than qa_tiny's seq_len of 64
tokens, so it is read in windows); each question is a word of it, the answer that
word's first occurrence (where does the passage say it?). A quarter of the questions
name a word the passage does not hold: they are unanswerable (`is_impossible`). The
held-out plays of the genre task make the eval file. Deterministic.
"""

from __future__ import annotations

import json
import os
import random
import re
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(os.path.dirname(HERE)))

from lmjax.data import genres  # noqa: E402


def questions(split: str, limit: int, rng: random.Random) -> dict:
  passages = [p for p, _ in genres.genre_examples(split, lines_per_passage=5)]
  rng.shuffle(passages)
  vocabulary = sorted({w for p in passages for w in re.findall(r"[a-z]{5,}", p)})
  paragraphs = []
  for n, context in enumerate(passages[:limit]):
    words = sorted(set(re.findall(r"\b[a-z]{5,}\b", context)))
    if not words:
      continue
    qid = f"{split}-{n}"
    if n % 4 == 3:  # unanswerable: a word this passage does not hold
      missing = rng.choice([w for w in rng.sample(vocabulary, 50) if w not in context] or ["zzzzz"])
      qa = {"id": qid, "question": missing,
            "is_impossible": True, "answers": []}
    else:
      word = rng.choice(words)
      start = re.search(rf"\b{word}\b", context).start()
      qa = {"id": qid, "question": word,
            "is_impossible": False, "answers": [{"text": word, "answer_start": start}]}
    paragraphs.append({"context": context, "qas": [qa]})
  return {"version": "v2.0", "data": [{"title": f"shakespeare-{split}",
                                       "paragraphs": paragraphs}]}


def main(out: str = HERE) -> None:
  for split, limit in (("train", 800), ("eval", 120)):
    with open(os.path.join(out, f"qa_{split}.json"), "w", encoding="utf-8") as f:
      json.dump(questions(split, limit, random.Random(split)), f, ensure_ascii=False, indent=0)


if __name__ == "__main__":
  main(sys.argv[1] if len(sys.argv) > 1 else HERE)
