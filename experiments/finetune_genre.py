"""Genre of a Shakespeare passage: comedy, tragedy or history (labels from the play list).

  python -m launch.finetune --config experiments/finetune_genre.py \
      --init_from runs/mlm_tiny --workdir runs/genre_mlm
  python -m launch.finetune --config experiments/finetune_genre.py:random \
      --init_from runs/mlm_tiny --workdir runs/genre_mlm_random

Passages are 12 consecutive lines from the first act on. Macbeth, Twelfth Night
and Henry VI part 1 are held out whole (one play per genre), so the classifier
must generalise across plays. `:random` keeps the architecture of --init_from but
not its weights: the baseline at equal steps.
"""

import ml_collections

from lmjax.experiment import default_config


def get_config(arg: str = "") -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict(default_config("classification"))
  c.task.dataset = "shakespeare_genre"
  c.data.seq_len = 128
  c.model.dropout_rate = 0.1
  c.optimizer.update(learning_rate=1e-4, warmup_steps=30, schedule="linear", end_lr_ratio=0.0,
                     weight_decay=0.01, b2=0.999)
  c.train.update(steps=300, batch_size=32, log_every=20, eval_every=100, eval_batches=0,
                 checkpoint_every=100,
                 init="random" if arg == "random" else "pretrained")
  return c
