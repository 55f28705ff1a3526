"""Shakespeare passages labelled comedy, tragedy or history (the First Folio's division).

Works in the corpus are separated by their title line followed by "by William
Shakespeare". Whole plays are held out for evaluation, so a classifier cannot
succeed by recognising a play's character names.
"""

from __future__ import annotations

import os
import re

from lmjax.data.corpus import BUNDLED_DIR

LABELS = ("comedy", "tragedy", "history")
GENRES = {
    "ALL'S WELL THAT ENDS WELL": "comedy", "AS YOU LIKE IT": "comedy",
    "THE COMEDY OF ERRORS": "comedy", "LOVE'S LABOUR'S LOST": "comedy",
    "MEASURE FOR MEASURE": "comedy", "THE MERCHANT OF VENICE": "comedy",
    "THE MERRY WIVES OF WINDSOR": "comedy", "A MIDSUMMER NIGHT'S DREAM": "comedy",
    "MUCH ADO ABOUT NOTHING": "comedy", "THE TAMING OF THE SHREW": "comedy",
    "THE TWO GENTLEMEN OF VERONA": "comedy", "THE WINTER'S TALE": "comedy",
    "TWELFTH NIGHT; OR, WHAT YOU WILL": "comedy",
    "ANTONY AND CLEOPATRA": "tragedy", "THE TRAGEDY OF CORIOLANUS": "tragedy",
    "CYMBELINE": "tragedy", "JULIUS CAESAR": "tragedy", "THE TRAGEDY OF KING LEAR": "tragedy",
    "OTHELLO, THE MOOR OF VENICE": "tragedy", "ROMEO AND JULIET": "tragedy",
    "THE LIFE OF TIMON OF ATHENS": "tragedy", "THE TRAGEDY OF TITUS ANDRONICUS": "tragedy",
    "THE HISTORY OF TROILUS AND CRESSIDA": "tragedy", "MACBETH": "tragedy",
    "KING HENRY IV, THE FIRST PART": "history", "KING HENRY IV, SECOND PART": "history",
    "THE LIFE OF KING HENRY V": "history", "KING HENRY VI, FIRST PART": "history",
    "HISTORY OF KING HENRY THE SIXTH, SECOND PART": "history",
    "THE HISTORY OF KING HENRY THE SIXTH, THIRD PART": "history",
    "THE LIFE OF HENRY THE EIGHTH": "history", "KING JOHN": "history",
    "THE TRAGEDY OF KING RICHARD THE SECOND": "history",
    "THE LIFE AND DEATH OF KING RICHARD III": "history",
}
# One held-out play per genre, all in the bundled corpus.
HELD_OUT = ("MACBETH", "TWELFTH NIGHT; OR, WHAT YOU WILL", "KING HENRY VI, FIRST PART")


def split_works(text: str) -> dict[str, list[str]]:
  """{title: body lines} for every work whose title precedes 'by William Shakespeare'."""
  lines = text.split("\n")
  starts = [i - 2 for i, line in enumerate(lines)
            if line.strip() == "by William Shakespeare" and i >= 2]
  works = {}
  for n, start in enumerate(starts):
    end = starts[n + 1] if n + 1 < len(starts) else len(lines)
    works[lines[start].strip()] = lines[start + 2:end]
  return works


def passages(body: list[str], lines_per_passage: int) -> list[str]:
  """Consecutive runs of non-empty lines from the first ACT on (skipping the cast list)."""
  first_act = next((i for i, line in enumerate(body) if re.match(r"^ACT I\b", line.strip())), 0)
  text = [line for line in body[first_act:] if line.strip()]
  return ["\n".join(text[i:i + lines_per_passage])
          for i in range(0, len(text) - lines_per_passage + 1, lines_per_passage)]


def genre_examples(split: str, lines_per_passage: int = 12,
                   files: tuple[str, ...] = ()) -> list[tuple[str, int]]:
  """(passage, label index) pairs of the train or eval split, in corpus order."""
  files = files or (os.path.join(BUNDLED_DIR, "train.txt"), os.path.join(BUNDLED_DIR, "valid.txt"))
  out = []
  for path in files:
    with open(path, encoding="utf-8") as f:
      works = split_works(f.read())
    for title, body in works.items():
      if title not in GENRES or (title in HELD_OUT) != (split == "eval"):
        continue
      label = LABELS.index(GENRES[title])
      out += [(p, label) for p in passages(body, lines_per_passage)]
  return out
