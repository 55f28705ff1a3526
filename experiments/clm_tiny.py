"""A small causal LM on the bundled Shakespeare slice: a few minutes on a laptop CPU.

  python -m launch.train --config experiments/clm_tiny.py --workdir runs/clm_tiny
  python -m launch.train --config experiments/clm_tiny.py:llama --workdir runs/llama_tiny

Variants (after the colon): `gpt2` (default: learned positions, LayerNorm, GELU,
tied head) or `llama` (RoPE, RMSNorm, SwiGLU, 2 KV heads, untied head).
"""

import ml_collections

from lmjax.data import bundled_corpus
from lmjax.experiment import default_config


def get_config(arg: str = "gpt2") -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict(default_config())
  c.model.update(
      family="decoder",
      vocab_size=2048,  # = the bundled tokenizer
      max_len=256,
      d_model=128, num_layers=4, num_heads=4, d_ff=512,
      scan_layers=False)  # 4 layers: unrolled steps are ~25% faster on CPU; compile is quick
  if arg == "llama":
    c.model.update(position="rope", norm="rmsnorm", mlp="swiglu", activation="silu",
                   num_kv_heads=2, d_ff=344, use_bias=False, tie_embeddings=False)
  elif arg != "gpt2":
    raise ValueError(f"clm_tiny variants are gpt2 and llama, got {arg!r}")
  c.data.update(**bundled_corpus(), seq_len=128)
  c.objective.kind = "clm"
  c.optimizer.update(learning_rate=2e-3, warmup_steps=30, weight_decay=0.1)
  c.train.update(steps=300, batch_size=32, log_every=10, eval_every=100, eval_batches=8,
                 checkpoint_every=100)
  return c
