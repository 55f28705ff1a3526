"""Writes the bundled Shakespeare corpus split by genre, the sources of experiments/clm_mixture.py:

  python experiments/data/make_genre_corpora.py   # rewrites experiments/data/genres/*.txt

experiments/data/genres/{comedy,tragedy,history}_{train,eval}.txt: every work of the
bundled corpus whose genre the First Folio gives (`lmjax.data.genres`), whole plays,
documents separated by blank lines as in the corpus. The eval files hold the plays the
genre task holds out (Twelfth Night, Macbeth, Henry VI part 1: one per genre), so each
source has its own held-out loss. Deterministic: the same files every time (a test
checks).
"""

from __future__ import annotations

import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(os.path.dirname(HERE)))

from lmjax.data import genres  # noqa: E402
from lmjax.data.corpus import BUNDLED_DIR  # noqa: E402

OUT = os.path.join(HERE, "genres")


def corpora() -> dict[str, str]:
  """{file name: text} of every genre's train and eval file."""
  parts: dict[str, list[str]] = {}
  for split in ("train", "valid"):
    with open(os.path.join(BUNDLED_DIR, f"{split}.txt"), encoding="utf-8") as f:
      works = genres.split_works(f.read())
    for title, body in works.items():
      if title in genres.GENRES:
        name = f"{genres.GENRES[title]}_{'eval' if title in genres.HELD_OUT else 'train'}.txt"
        parts.setdefault(name, []).append("\n".join([title, ""] + body).strip() + "\n")
  return {name: "\n\n".join(texts) for name, texts in sorted(parts.items())}


def main(out: str = OUT) -> None:
  os.makedirs(out, exist_ok=True)
  for name, text in corpora().items():
    with open(os.path.join(out, name), "w", encoding="utf-8") as f:
      f.write(text)
    print(f"{name}: {len(text):,} characters")


if __name__ == "__main__":
  main()
