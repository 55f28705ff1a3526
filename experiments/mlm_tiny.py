"""A small BERT-style masked LM on the bundled Shakespeare slice (laptop CPU, minutes).

  python -m launch.train --config experiments/mlm_tiny.py --workdir runs/mlm_tiny
"""

import ml_collections

from lmjax.data import bundled_corpus
from lmjax.experiment import default_config


def get_config(arg: str = "") -> ml_collections.ConfigDict:
  del arg
  c = ml_collections.ConfigDict(default_config("mlm"))
  c.model.update(
      family="encoder",
      vocab_size=2048,  # = the bundled tokenizer
      max_len=256,
      d_model=128, num_layers=4, num_heads=4, d_ff=512,
      norm_position="post", embedding_norm=True, activation="gelu_exact",
      norm_eps=1e-12, type_vocab_size=2,  # BERT's layout
      scan_layers=False)  # 4 layers: unrolled steps are ~25% faster on CPU; compile is quick
  c.data.update(**bundled_corpus(), seq_len=128)
  c.objective.update(kind="mlm", mask_rate=0.15)
  # MLM learns from the 15% masked tokens only, so it gets more steps than clm_tiny.
  c.optimizer.update(learning_rate=3e-3, warmup_steps=30, weight_decay=0.01, b2=0.98)
  c.train.update(steps=500, batch_size=32, log_every=10, eval_every=100, eval_batches=8,
                 checkpoint_every=100)
  return c
