"""BERT-base (110M) masked LM, for one accelerator or more.

  python -m launch.train --config experiments/bert_base.py --workdir runs/bert \
      --config.data.train_files="('wiki.jsonl',)" --config.data.tokenizer=spm30k.model

Defaults to the bundled corpus and tokenizer so it runs as is.
"""

import ml_collections

from lmjax.data import bundled_corpus
from lmjax.experiment import default_config


def get_config(arg: str = "") -> ml_collections.ConfigDict:
  del arg
  c = ml_collections.ConfigDict(default_config("mlm"))
  c.model.update(
      family="encoder",
      vocab_size=30592,  # BERT's 30522 rounded up to a multiple of 128
      max_len=512,
      d_model=768, num_layers=12, num_heads=12, d_ff=3072,
      norm_position="post", embedding_norm=True, norm_eps=1e-12,
      activation="gelu_exact", type_vocab_size=2, tie_embeddings=True,
      dropout_rate=0.1,
      dtype="bfloat16",
      scan_layers=True, remat_policy="none")
  c.data.update(**bundled_corpus(), seq_len=128)  # BERT phase 1; phase 2 raises it to 512
  c.objective.update(kind="mlm", mask_rate=0.15, mask_token_prob=0.8, random_token_prob=0.1)
  c.optimizer.update(learning_rate=1e-4, warmup_steps=10_000, schedule="linear", end_lr_ratio=0.0,
                     b1=0.9, b2=0.999, eps=1e-6, weight_decay=0.01, clip_grad_norm=1.0)
  c.train.update(steps=1_000_000, batch_size=256, log_every=100, eval_every=5000,
                 eval_batches=20, checkpoint_every=5000)
  return c
