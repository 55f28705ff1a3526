"""A Gemma-shaped decoder on the bundled corpus: sandwich norms with (1 + w) RMSNorm,
embeddings scaled by sqrt(d), GeGLU, local (sliding-window) and global layers, soft-capping.

  python -m launch.train --config experiments/gemma_tiny.py --workdir runs/gemma_tiny
  python -m launch.train --config experiments/gemma_tiny.py:gemma3 --workdir runs/gemma3_tiny
  python -m launch.compile --config experiments/gemma_tiny.py:2b --topology v5e:4x4 \
      --config.objective.fused_head=on --config.model.remat_policy=full  # 10.2 GiB per chip

Variants (after the colon): `tiny` (default: Gemma 2's features at clm_tiny's size and
budget: local and global layers alternate, window 32 of the 128-token rows, attention
scores capped at 50 and logits at 30), `gemma3` (Gemma 3's: five local layers to one
global, qk-norm, local and global RoPE bases, no soft-capping) and `2b` (Gemma 2 2B's shape:
d2304, 26 layers, 8 query and 4 KV heads of 256, d_ff 9216, window 4096, its 256,000-entry
vocabulary; bfloat16, FSDP, for accelerators and `launch.compile`).
"""

import ml_collections

from lmjax.data import bundled_corpus
from lmjax.experiment import default_config

GEMMA = dict(family="decoder", position="rope", rope_theta=10_000.0, norm="rmsnorm",
             norm_eps=1e-6, norm_position="sandwich", norm_plus_one=True, embed_scale=True,
             mlp="swiglu", activation="gelu_tanh", use_bias=False, tie_embeddings=True)
GEMMA2 = dict(layer_types=("local", "global"), attn_softcap=50.0, final_softcap=30.0)


def get_config(arg: str = "tiny") -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict(default_config())
  c.data.update(**bundled_corpus(), seq_len=128)
  c.optimizer.update(learning_rate=2e-3, warmup_steps=30, weight_decay=0.1)
  c.train.update(steps=300, batch_size=32, log_every=10, eval_every=100, eval_batches=8,
                 checkpoint_every=100)
  tiny = dict(vocab_size=2048, max_len=256, d_model=128, num_layers=4, num_heads=4,
              num_kv_heads=2, head_dim=32, attn_scale_dim=32.0, d_ff=384, sliding_window=32,
              scan_layers=False)
  if arg == "tiny":
    c.model.update(**GEMMA, **GEMMA2, **tiny)
  elif arg == "gemma3":
    c.model.update(**{**GEMMA, **tiny, "num_layers": 6, "rope_theta": 1_000_000.0},
                   qk_norm="head", rope_local_theta=10_000.0,
                   layer_types=("local",) * 5 + ("global",))
  elif arg == "2b":
    c.model.update(**GEMMA, **GEMMA2, vocab_size=256_000, max_len=8192, d_model=2304,
                   num_layers=26, num_heads=8, num_kv_heads=4, head_dim=256,
                   attn_scale_dim=256.0, d_ff=9216, sliding_window=4096, dtype="bfloat16",
                   scan_layers=True, remat_policy="dots_no_batch")
    c.data.seq_len = 2048
    c.mesh.update(data=1, fsdp=-1)
    c.optimizer.update(learning_rate=3e-4, warmup_steps=2000)
    c.train.update(steps=100_000, batch_size=64, eval_every=2000)
  else:
    raise ValueError(f"gemma_tiny variants are tiny, gemma3 and 2b, got {arg!r}")
  return c
