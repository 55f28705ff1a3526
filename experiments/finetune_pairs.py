"""Sentence-pair classification, GLUE-style: are two Shakespeare passages of the same genre?

  python -m launch.finetune --config experiments/finetune_pairs.py \
      --init_from runs/mlm_tiny --workdir runs/pairs

Files are JSON lines {"text", "text_pair", "label"} (experiments/data/genre_pairs_*,
made from the bundled plays; eval passages come mostly from held-out plays). An
encoder sees [CLS] a [SEP] b [SEP] with token types 0/1, a decoder [BOS] a [EOS]
b [EOS]. results.json reports accuracy, F1 (of the second label) and Matthews
correlation, as GLUE does for MRPC/QQP and CoLA. Point task.train_file,
task.eval_file and task.labels at your own data.
"""

import os

import ml_collections

from lmjax.experiment import default_config

DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")


def get_config(arg: str = "") -> ml_collections.ConfigDict:
  del arg
  c = ml_collections.ConfigDict(default_config("classification"))
  c.task.update(train_file=os.path.join(DATA, "genre_pairs_train.jsonl"),
                eval_file=os.path.join(DATA, "genre_pairs_eval.jsonl"),
                labels=("different_genre", "same_genre"))
  c.data.seq_len = 128
  c.model.dropout_rate = 0.1
  c.optimizer.update(learning_rate=1e-4, warmup_steps=30, schedule="linear", end_lr_ratio=0.0,
                     weight_decay=0.01, b2=0.999)
  c.train.update(steps=300, batch_size=32, log_every=20, eval_every=100, eval_batches=0,
                 checkpoint_every=100)
  return c
