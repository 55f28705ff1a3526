"""Writes the GRPO prompt sets from the bundled preference sets:

  python experiments/data/make_grpo.py   # rewrites experiments/data/grpo_{train,eval}.jsonl

Each record is a `dpo_*.jsonl` pair's prompt (a passage, "Who speaks first?") with the
verifiable answer: `answer` is the chosen reply ("CLOWN speaks first."), `speaker` the
name in it. The eval file's plays are held out (as dpo_eval's). Deterministic.
"""

from __future__ import annotations

import json
import os

HERE = os.path.dirname(os.path.abspath(__file__))


def main() -> None:
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


if __name__ == "__main__":
  main()
