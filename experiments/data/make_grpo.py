"""Writes the GRPO prompt sets from the bundled corpus:

  python experiments/data/make_grpo.py   # rewrites experiments/data/grpo_*.jsonl

grpo_{train,eval}.jsonl: each record is a `dpo_*.jsonl` pair's prompt (a passage, "Who
speaks first?") with the verifiable answer: `answer` is the chosen reply ("CLOWN speaks
first."), `speaker` the name in it. The eval file's plays are held out (as dpo_eval's).

grpo_speakers_{train,eval}.jsonl: three speeches, each a name of NAMES (one token each
for chat_tiny's tokenizer) and a line of the genre corpora (the eval file's from their
held-out plays), and "Who speaks first? Give the name."; the answer is the first name
alone. Eight names, so a model that picks one at random is right 1 time in 8. grpo_speakers_warmup.jsonl: 3,200
other prompts of the train plays, each with a name drawn at random as the reply (SFT on
it teaches the answer's form and the eight names, at chance). Deterministic.
"""

from __future__ import annotations

import json
import os
import random

HERE = os.path.dirname(os.path.abspath(__file__))
NAMES = ("PRINCE", "CLEOPATRA", "FALSTAFF", "ROSALIND", "ANTONY", "KING", "ORLANDO", "CELIA")


def passages() -> None:
  for split in ("train", "eval"):
    out = []
    with open(os.path.join(HERE, f"dpo_{split}.jsonl"), encoding="utf-8") as f:
      for line in f:
        pair = json.loads(line)
        answer = pair["chosen"][0]["content"]
        out.append({"prompt": pair["prompt"], "answer": answer,
                    "speaker": answer.removesuffix(" speaks first.")})
    with open(os.path.join(HERE, f"grpo_{split}.jsonl"), "w", encoding="utf-8") as f:
      f.writelines(json.dumps(r) + "\n" for r in out)


def corpus_lines(split: str) -> list[str]:
  """Lines of the genre corpora's `split` plays that read as speech (25-60 characters)."""
  out = set()
  for genre in ("comedy", "history", "tragedy"):
    with open(os.path.join(HERE, "genres", f"{genre}_{split}.txt"), encoding="utf-8") as f:
      for line in f:
        line = line.strip()
        if 25 <= len(line) <= 60 and line[0].isupper() and not line.isupper() \
            and "[" not in line:
          out.add(line)
  return sorted(out)


def speakers(split: str, n: int, seed: int) -> list[dict]:
  rng, lines = random.Random(seed), corpus_lines(split)
  out = []
  for _ in range(n):
    names = rng.sample(NAMES, 3)
    text = "".join(f"{name}.\n{rng.choice(lines)}\n" for name in names)
    question = text + "\nWho speaks first? Give the name."
    out.append({"prompt": [{"role": "user", "content": question}],
                "answer": names[0], "speaker": names[0]})
  return out


def write(name: str, records: list[dict]) -> None:
  with open(os.path.join(HERE, name), "w", encoding="utf-8") as f:
    f.writelines(json.dumps(r) + "\n" for r in records)


def main() -> None:
  passages()
  train = speakers("train", 800, 0)
  write("grpo_speakers_train.jsonl", train)
  write("grpo_speakers_eval.jsonl", speakers("eval", 120, 1))
  rng = random.Random(2)
  write("grpo_speakers_warmup.jsonl", [
      {"messages": r["prompt"] + [{"role": "assistant",
                                   "content": rng.choice(NAMES)}]}
      for r in speakers("train", 3200, 3)])


if __name__ == "__main__":
  main()
