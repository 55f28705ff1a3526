"""GPT-2 small (124M) causal LM, for one accelerator or more.

  python -m launch.train --config experiments/gpt2_small.py --workdir runs/gpt2 \
      --config.data.train_files="('owt_train.jsonl',)" \
      --config.data.eval_files="('owt_valid.jsonl',)" --config.data.tokenizer=spm32k.model

The bundled Shakespeare slice and its tokenizer are the defaults, so the file
runs as is; point data.* at a real corpus (and a 32k-50k tokenizer) for real work.
"""

import ml_collections

from lmjax.data import bundled_corpus
from lmjax.experiment import default_config


def get_config(arg: str = "") -> ml_collections.ConfigDict:
  del arg
  c = ml_collections.ConfigDict(default_config())
  c.model.update(
      family="decoder",
      vocab_size=50304,  # GPT-2's 50257 rounded up to a multiple of 128 for the MXU/tensor cores
      max_len=1024,
      d_model=768, num_layers=12, num_heads=12, d_ff=3072,
      position="learned", norm="layernorm", mlp="gelu", activation="gelu_tanh",
      tie_embeddings=True, dropout_rate=0.0,
      dtype="bfloat16",  # float32 master weights, bfloat16 compute
      scan_layers=True, remat_policy="dots_no_batch")
  c.data.update(**bundled_corpus(), seq_len=1024)
  c.objective.kind = "clm"
  c.optimizer.update(learning_rate=6e-4, warmup_steps=2000, schedule="cosine", end_lr_ratio=0.1,
                     b1=0.9, b2=0.95, weight_decay=0.1, clip_grad_norm=1.0)
  c.train.update(steps=100_000, batch_size=512, grad_accum_steps=1,  # 0.5M tokens per step
                 log_every=50, eval_every=1000, eval_batches=20, checkpoint_every=1000)
  return c
