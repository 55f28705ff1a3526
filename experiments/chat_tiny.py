"""Chat SFT of a small pretrained decoder on conversations about the bundled plays.

  python -m launch.train --config experiments/clm_tiny.py --workdir runs/clm_tiny
  python -m launch.finetune --config experiments/chat_tiny.py --init_from runs/clm_tiny \
      --workdir runs/chat_tiny
  python -m launch.generate --workdir runs/chat_tiny --chat --prompt "..."

Conversations (experiments/data/chat_{train,eval}.jsonl, written from the bundled
corpus by experiments/data/make_dialogues.py) show a passage of a play and ask who
speaks first and who answers; the eval set's plays are held out. Some are one
prompt/completion pair, some are longer than `data.seq_len` and keep their newest
turns (`objective.truncation=newest`). The template is lmjax's default (the run keeps it
in chat_template.jinja); the loss covers the assistant's tokens only, and
results.json holds the held-out loss and accuracy per assistant token.
"""

import os

import ml_collections

from lmjax.experiment import default_config

DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")


def get_config(arg: str = "") -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict(default_config("sft"))
  c.task.update(train_file=os.path.join(DATA, "chat_train.jsonl"),
                eval_file=os.path.join(DATA, "chat_eval.jsonl"))
  c.objective.truncation = "newest"
  c.data.seq_len = 256
  c.model.dropout_rate = 0.0
  c.optimizer.update(learning_rate=1e-3, warmup_steps=20, schedule="cosine",
                     weight_decay=0.0)
  c.train.update(steps=400, batch_size=16, log_every=10, eval_every=100, eval_batches=0,
                 checkpoint_every=50)
  return c
