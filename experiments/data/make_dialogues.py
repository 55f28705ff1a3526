"""Writes the bundled chat and preference sets from the bundled Shakespeare corpus:

  python experiments/data/make_dialogues.py   # rewrites experiments/data/{chat,dpo}_*.jsonl

Each conversation shows a passage of a play and asks who speaks in it; the
assistant answers from the speaker tags ("FAL.", "PRINCE."). Plays held out for
the genre task (Macbeth, Twelfth Night, Henry VI part 1) make the eval files, so
the answers must be read from the passage, not remembered. The preference set
asks who speaks first: chosen names the first speaker, rejected another one of
the passage. Deterministic: the same files every time (a test checks).
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
from lmjax.data.corpus import BUNDLED_DIR  # noqa: E402

TAG = re.compile(r"^([A-Z][A-Z' -]{1,30})\.$")
SYSTEM = "You answer questions about passages of Shakespeare's plays."


def scenes(split: str, lines: int) -> list[tuple[str, list[str]]]:
  """(passage, speaker tags in order) of each passage with at least two speakers."""
  out = []
  for path in (os.path.join(BUNDLED_DIR, "train.txt"), os.path.join(BUNDLED_DIR, "valid.txt")):
    with open(path, encoding="utf-8") as f:
      works = genres.split_works(f.read())
    for title, body in works.items():
      if title not in genres.GENRES or (title in genres.HELD_OUT) != (split == "eval"):
        continue
      for passage in genres.passages(body, lines):
        tags = [m.group(1) for m in map(TAG.match, passage.split("\n"))
                if m and not m.group(1).startswith(("ACT ", "SCENE"))]
        speakers = list(dict.fromkeys(tags))
        if len(speakers) >= 2:
          out.append((passage.rstrip(), speakers))
  return out


def conversation(passage: str, speakers: list[str], rng: random.Random) -> dict:
  first, second = speakers[0], speakers[1]
  messages = [{"role": "user", "content": f"{passage}\n\nWho speaks first?"},
              {"role": "assistant", "content": f"{first} speaks first."}]
  if rng.random() < 0.5:
    messages += [{"role": "user", "content": f"And who answers {first}?"},
                 {"role": "assistant", "content": f"{second} answers."}]
  if rng.random() < 0.3:
    messages.insert(0, {"role": "system", "content": SYSTEM})
  return {"messages": messages}


def write(path: str, records: list[dict]) -> None:
  with open(path, "w", encoding="utf-8") as f:
    for r in records:
      f.write(json.dumps(r, ensure_ascii=False) + "\n")


def main(out: str = HERE) -> None:
  for split, limit in (("train", 800), ("eval", 120)):
    rng = random.Random(split)
    found = scenes(split, 6)
    rng.shuffle(found)
    chats = [conversation(p, s, rng) for p, s in found[:limit]]
    # Prompt/completion records, and a few long conversations that need truncation.
    for p, s in found[limit:limit + limit // 8]:
      chats.append({"prompt": f"{p}\n\nWho speaks first?", "completion": f"{s[0]} speaks first."})
    for p, s in rng.sample(found, limit // 20):
      turns = [conversation(p2, s2, rng)["messages"] for p2, s2 in rng.sample(found, 4)]
      chats.append({"messages": [m for t in turns for m in t if m["role"] != "system"]})
    write(os.path.join(out, f"chat_{split}.jsonl"), chats)
    prefs = []
    for p, s in found[:limit]:
      wrong = rng.choice(s[1:])
      prompt = [{"role": "user", "content": f"{p}\n\nWho speaks first?"}]
      prefs.append({"prompt": prompt,
                    "chosen": [{"role": "assistant", "content": f"{s[0]} speaks first."}],
                    "rejected": [{"role": "assistant", "content": f"{wrong} speaks first."}]})
    write(os.path.join(out, f"dpo_{split}.jsonl"), prefs)


if __name__ == "__main__":
  main(sys.argv[1] if len(sys.argv) > 1 else HERE)
