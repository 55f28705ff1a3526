"""GRPO of a chat model on a task with a verifiable answer: who speaks first.

  python -m launch.train --config experiments/clm_tiny.py --workdir runs/clm_tiny
  python -m launch.finetune --config experiments/chat_tiny.py --init_from runs/clm_tiny \
      --workdir runs/chat_tiny
  python -m launch.finetune --config experiments/grpo_tiny.py:warmup \
      --init_from runs/chat_tiny --workdir runs/grpo_warmup
  python -m launch.finetune --config experiments/grpo_tiny.py --init_from runs/grpo_warmup \
      --workdir runs/grpo_tiny [--config.objective.loss_type=grpo ...]

Each prompt (experiments/data/grpo_speakers_{train,eval}.jsonl, from make_grpo.py) shows
three speeches whose speakers are drawn from eight names and asks "Who speaks first? Give
the name."; the eval prompts' lines come from held-out plays. Eight replies are sampled per
prompt with the run's current weights and scored by `exact_match` (the reply is the
record's `answer`, the bare name; weight 1); `speaker_similarity` (registered below) and
`format` are logged with weight 0. results.json holds the held-out greedy replies' mean of
each reward, `reward_exact_match` being the held-out exact match (11.7% -> 74.2% in 360
steps, docs/post_training.md). chat_tiny misspells the names, so a short SFT warm-up
(`:warmup`, 3,200 other prompts answered with a name drawn at random) first teaches the
answer's form and the eight names, at chance (1 in 8).

`:passages` is the first, harder task (a passage of a play, "Who speaks first?", answered
"CLOWN speaks first.", with partial credit for a similar name), run from chat_tiny: the
1.1M-parameter model cannot copy the name out of the passage and stays at 0% held-out
exact match (docs/post_training.md says why). `:speakers` and `:speakers_warmup` are the
default's and `:warmup`'s earlier names.
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
  if arg in ("warmup", "speakers_warmup"):
    return warmup_config()
  if arg not in ("", "speakers", "passages"):
    raise ValueError(f"grpo_tiny: unknown variant {arg!r} (warmup, passages)")
  c = ml_collections.ConfigDict(default_config("grpo"))
  name = "grpo" if arg == "passages" else "grpo_speakers"
  c.task.update(train_file=os.path.join(DATA, f"{name}_train.jsonl"),
                eval_file=os.path.join(DATA, f"{name}_eval.jsonl"))
  c.objective.update(rewards=("exact_match", "speaker_similarity", "format"),
                     num_generations=8, temperature=1.0, loss_type="dapo", epsilon_low=0.2,
                     epsilon_high=0.28, beta=0.0)
  c.model.dropout_rate = 0.0
  c.optimizer.update(warmup_steps=5, schedule="constant", weight_decay=0.0)
  c.train.update(batch_size=32, log_every=5, eval_batches=0, checkpoint_every=20)
  if arg == "passages":  # "CLOWN speaks first.", partial credit for a similar name
    c.objective.update(reward_weights=(1.0, 0.5, 0.0), max_completion_tokens=12,
                       format_regex=r"[A-Z][A-Z' -]* speaks first\.")
    c.data.seq_len = 208  # the longest prompt (182 tokens) and its reply
    c.optimizer.learning_rate = 3e-4
    c.train.update(steps=120, eval_every=40)
  else:  # exact match alone; the name's similarity and form are logged
    c.objective.update(reward_weights=(1.0, 0.0, 0.0), max_completion_tokens=8,
                       format_regex=r"[A-Z]+")
    c.data.seq_len = 144  # the longest prompt (121 tokens) and its reply
    c.optimizer.learning_rate = 1.5e-4  # 3e-4 collapses the replies (docs/post_training.md)
    c.train.update(steps=360, eval_every=20)
  return c


def warmup_config() -> ml_collections.ConfigDict:
  """The warm-up SFT: grpo_speakers_warmup.jsonl (chat_tiny's settings, 200 steps of 16)."""
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
