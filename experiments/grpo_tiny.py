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
  c = ml_collections.ConfigDict(default_config("grpo"))
  c.task.update(train_file=os.path.join(DATA, "grpo_train.jsonl"),
                eval_file=os.path.join(DATA, "grpo_eval.jsonl"))
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
  return c
