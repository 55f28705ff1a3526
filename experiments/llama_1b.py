"""A ~1B-parameter LLaMA-style causal LM (RoPE, RMSNorm, SwiGLU, GQA) for accelerators.

  python -m launch.train --config experiments/llama_1b.py --workdir runs/llama1b \
      --config.data.tokenizer=spm32k.model --config.data.train_files="('corpus.jsonl',)"

Variant `:fsdp` shards parameters and optimizer state over all devices (fsdp=-1).
Variant `:v5e16` is `:fsdp` with full rematerialisation and 128 rows of 2048 per step:
of the variants compiled for v5e:4x4 here (docs/scaling.md), the one that fits its
16 GiB per chip (7.1 GiB; keeping dots needs 19.7, data parallelism does not fit).
"""

import ml_collections

from lmjax.data import bundled_corpus
from lmjax.experiment import default_config


def get_config(arg: str = "") -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict(default_config())
  c.model.update(
      family="decoder",
      vocab_size=32768,
      max_len=2048,
      d_model=2048, num_layers=16, num_heads=32, num_kv_heads=8, d_ff=8192,
      position="rope", rope_theta=500_000.0, norm="rmsnorm", norm_eps=1e-5,
      mlp="swiglu", activation="silu", use_bias=False, tie_embeddings=False,
      dtype="bfloat16",
      scan_layers=True, remat_policy="dots_no_batch")
  c.data.update(**bundled_corpus(), seq_len=2048)
  c.objective.kind = "clm"
  c.optimizer.update(learning_rate=3e-4, warmup_steps=2000, schedule="cosine", end_lr_ratio=0.1,
                     b1=0.9, b2=0.95, weight_decay=0.1, clip_grad_norm=1.0)
  c.train.update(steps=200_000, batch_size=256, log_every=20, eval_every=2000, eval_batches=10,
                 checkpoint_every=1000)
  if arg in ("fsdp", "v5e16"):
    c.mesh.update(data=1, fsdp=-1)
  if arg == "v5e16":
    c.model.remat_policy = "full"
    c.train.batch_size = 128
  elif arg not in ("", "fsdp"):
    raise ValueError(f"llama_1b variants: fsdp, v5e16; got {arg!r}")
  return c
