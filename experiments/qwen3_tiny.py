"""A Qwen3-shaped decoder on the bundled corpus: qk-norm, head_dim apart from d_model, GQA,
RoPE with Qwen's base, tied embeddings.

  python -m launch.train --config experiments/qwen3_tiny.py --workdir runs/qwen3_tiny
  python -m launch.compile --config experiments/qwen3_tiny.py:0.6b --topology v5e:4x4 \
      --config.objective.fused_head=on      # fits: 8.2 GiB per chip (docs/scaling.md)

Variants (after the colon): `tiny` (default: clm_tiny's data and budget, d128, 4 layers) and
`0.6b` (Qwen3-0.6B's shape: d1024, 28 layers, 16 query and 8 KV heads of 128, d_ff 3072,
its 151,936-entry vocabulary; bfloat16, FSDP, for accelerators and `launch.compile`).
A Hugging Face Qwen3 directory imports as the same architecture (docs/pretrained.md).
"""

import ml_collections

from lmjax.data import bundled_corpus
from lmjax.experiment import default_config

QWEN3 = dict(family="decoder", position="rope", rope_theta=1_000_000.0, norm="rmsnorm",
             norm_eps=1e-6, mlp="swiglu", activation="silu", use_bias=False, qk_norm="head",
             tie_embeddings=True)


def get_config(arg: str = "tiny") -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict(default_config())
  c.data.update(**bundled_corpus(), seq_len=128)
  c.optimizer.update(learning_rate=2e-3, warmup_steps=30, weight_decay=0.1)
  c.train.update(steps=300, batch_size=32, log_every=10, eval_every=100, eval_batches=8,
                 checkpoint_every=100)
  if arg == "tiny":
    c.model.update(**QWEN3, vocab_size=2048, max_len=256, d_model=128, num_layers=4,
                   num_heads=4, num_kv_heads=2, head_dim=48, d_ff=384, scan_layers=False)
  elif arg == "0.6b":
    c.model.update(**QWEN3, vocab_size=151_936, max_len=40_960, d_model=1024, num_layers=28,
                   num_heads=16, num_kv_heads=8, head_dim=128, d_ff=3072, dtype="bfloat16",
                   scan_layers=True, remat_policy="dots_no_batch")
    c.data.seq_len = 2048
    c.mesh.update(data=1, fsdp=-1)
    c.optimizer.update(learning_rate=3e-4, warmup_steps=2000)
    c.train.update(steps=100_000, batch_size=64, eval_every=2000)
  else:
    raise ValueError(f"qwen3_tiny variants are tiny and 0.6b, got {arg!r}")
  return c
