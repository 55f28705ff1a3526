"""GRPO of a chat model on a task with a verifiable answer: who speaks first in a passage.

  python -m launch.train --config experiments/clm_tiny.py --workdir runs/clm_tiny
  python -m launch.finetune --config experiments/chat_tiny.py --init_from runs/clm_tiny \
      --workdir runs/chat_tiny
  python -m launch.finetune --config experiments/grpo_tiny.py --init_from runs/chat_tiny \
      --workdir runs/grpo_tiny [--config.objective.loss_type=grpo ...]

Each prompt (experiments/data/grpo_{train,eval}.jsonl, from make_grpo.py) shows a passage
and asks who speaks first; the eval plays are held out. Eight replies are sampled per
prompt with the run's current weights, and scored by `exact_match` (the reply is the
record's `answer`, "CLOWN speaks first.", weight 1) and `speaker_similarity` (registered
below: partial credit for a name close to the first speaker's, weight 0.5); `format` (the
reply has the answer's form) is logged with weight 0: rewarded, the form alone is learned
in a few steps and every group's replies then score the same (docs/post_training.md).
results.json holds the held-out greedy replies' mean of each reward,
`reward_exact_match` being the held-out exact match.

`:speakers` is an easier task tried for the exact-match target (docs/post_training.md has
both curves): three speeches whose speakers are drawn from eight names, "Who speaks first?
Give the name." (experiments/data/grpo_speakers_*.jsonl, from make_grpo.py), the reply
the bare name, scored by `exact_match` alone. chat_tiny misspells the names, so a short
SFT warm-up (`:speakers_warmup`, 3,200 other prompts answered with a name drawn at random)
first teaches the answer's form and the eight names, at chance (1 in 8):

  python -m launch.finetune --config experiments/grpo_tiny.py:speakers_warmup \
      --init_from runs/chat_tiny --workdir runs/speakers_warmup
  python -m launch.finetune --config experiments/grpo_tiny.py:speakers \
      --init_from runs/speakers_warmup --workdir runs/grpo_speakers
"""

import difflib
import os

import ml_collections

from lmjax.experiment import default_config
from lmjax.objectives import register_reward

DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")


@register_reward("speaker_similarity")
def speaker_similarity(prompt, completion, record) -> float:
  """Partial credit, 0 to 1: how close the name the reply gives (its text before " speaks
  first") is to the first speaker's, difflib's ratio ("CLEN" for CLOWN: 0.67)."""
  name = completion.strip().split(" speaks first")[0]
  return difflib.SequenceMatcher(None, name, record["speaker"]).ratio()


def get_config(arg: str = "") -> ml_collections.ConfigDict:
  if arg == "speakers_warmup":
    return warmup_config()
  if arg not in ("", "speakers"):
    raise ValueError(f"grpo_tiny: unknown variant {arg!r} (speakers, speakers_warmup)")
  c = ml_collections.ConfigDict(default_config("grpo"))
  name = "grpo_speakers" if arg else "grpo"
  c.task.update(train_file=os.path.join(DATA, f"{name}_train.jsonl"),
                eval_file=os.path.join(DATA, f"{name}_eval.jsonl"))
  c.objective.update(rewards=("exact_match", "speaker_similarity", "format"),
                     reward_weights=(1.0, 0.5, 0.0),
                     format_regex=r"[A-Z][A-Z' -]* speaks first\.",
                     num_generations=8, temperature=1.0, max_completion_tokens=12,
                     loss_type="dapo", epsilon_low=0.2, epsilon_high=0.28, beta=0.0)
  c.data.seq_len = 208  # the longest prompt (182 tokens) and its reply
  c.model.dropout_rate = 0.0
  c.optimizer.update(learning_rate=3e-4, warmup_steps=5, schedule="constant", weight_decay=0.0)
  c.train.update(steps=120, batch_size=32, log_every=5, eval_every=40, eval_batches=0,
                 checkpoint_every=20)
  if arg == "speakers":  # exact match alone; the name's similarity and form are logged
    c.objective.update(reward_weights=(1.0, 0.0, 0.0), format_regex=r"[A-Z]+",
                       max_completion_tokens=8)
    c.data.seq_len = 144  # the longest prompt (121 tokens) and its reply
    c.optimizer.learning_rate = 1.5e-4  # 3e-4 collapses the replies (docs/post_training.md)
    c.train.update(steps=360, eval_every=20)
  return c


def warmup_config() -> ml_collections.ConfigDict:
  """SFT on grpo_speakers_warmup.jsonl (chat_tiny's settings, 200 steps of 16)."""
  c = ml_collections.ConfigDict(default_config("sft"))
  path = os.path.join(DATA, "grpo_speakers_warmup.jsonl")
  c.task.update(train_file=path, eval_file=path)
  c.objective.truncation = "newest"
  c.data.seq_len = 144
  c.model.dropout_rate = 0.0
  c.optimizer.update(learning_rate=1e-3, warmup_steps=10, schedule="cosine", weight_decay=0.0)
  c.train.update(steps=200, batch_size=16, log_every=10, eval_every=0, eval_batches=2,
                 checkpoint_every=200)
  return c
