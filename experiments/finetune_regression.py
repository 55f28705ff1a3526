"""Regression of one text, GLUE-style (as STS-B): the number of words in a line of verse.

  python -m launch.finetune --config experiments/finetune_regression.py \
      --init_from runs/mlm_tiny --workdir runs/words

Files are JSON lines {"text", "label": a number} (experiments/data/line_words_*,
from the bundled plays; eval lines come from held-out plays); the head is one
output trained with mean squared error. results.json reports Pearson and
Spearman correlation and the MSE. Add "text_pair" to the records for a pair task
such as STS-B.
"""

import os

import ml_collections

from lmjax.experiment import default_config

DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")


def get_config(arg: str = "") -> ml_collections.ConfigDict:
  del arg
  c = ml_collections.ConfigDict(default_config("regression"))
  c.task.update(train_file=os.path.join(DATA, "line_words_train.jsonl"),
                eval_file=os.path.join(DATA, "line_words_eval.jsonl"))
  c.data.seq_len = 64
  c.model.dropout_rate = 0.1
  c.optimizer.update(learning_rate=3e-4, warmup_steps=30, schedule="linear", end_lr_ratio=0.0,
                     weight_decay=0.01, b2=0.999)
  c.train.update(steps=300, batch_size=32, log_every=20, eval_every=100, eval_batches=0,
                 checkpoint_every=100)
  return c
