"""Splash attention: the TPU Pallas kernel shipped with JAX, for packed causal or
bidirectional rows.

The kernel skips the blocks that its (static) mask and the segment ids rule out
and never materialises a (T, S) score matrix. Its mask is fixed when the kernel
is built, so a prefix-LM's per-example prefix lengths cannot be expressed: that
case is refused with a pointer to `blockwise`.

A Pallas kernel is one program per device: under a mesh it runs inside
`shard_map` over the batch and head axes that the logical rules give
(`batch`, `heads`); the sequence must not be sharded. Off TPU (tests on CPU) it
runs in Pallas interpret mode.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as masks
from jax.sharding import PartitionSpec

Array = jax.Array
BLOCK = 512  # rows and keys per kernel block at long lengths (MaxText's default)
MIN_BLOCK = 128  # the TPU lane width: lengths are padded to a multiple of it


def _block(length: int) -> int:
  return next(b for b in (BLOCK, 256, MIN_BLOCK) if length % b == 0)


def _kernel(length: int, groups: int, causal: bool, interpret: bool, window: int | None,
            softcap: float):
  """The kernel in MQA form for G query heads. Built per trace, not cached: it holds
  arrays, which inside a transformation (nn.scan) are that trace's tracers. `window`: the
  kernel's LocalMask, a query sees keys q - (window - 1) .. q, and skips the blocks outside."""
  shape = (length, length)
  if window is not None:
    head_mask = masks.LocalMask(shape, window_size=(window - 1, 0), offset=0)
  else:
    head_mask = masks.CausalMask(shape) if causal else masks.FullMask(shape)
  b = _block(length)
  sizes = splash.BlockSizes(block_q=b, block_kv=b, block_kv_compute=b, block_q_dkv=b,
                            block_kv_dkv=b, block_kv_dkv_compute=b, block_q_dq=b, block_kv_dq=b)
  return splash.make_splash_mqa(masks.MultiHeadMask([head_mask] * groups), block_sizes=sizes,
                                head_shards=1, q_seq_shards=1, interpret=interpret,
                                attn_logits_soft_cap=softcap or None)


def _local(q: Array, k: Array, v: Array, segment_ids: Array, causal: bool,
           interpret: bool, window: int | None = None, scale: float | None = None,
           softcap: float = 0.0) -> Array:
  """This device's part: q (B, T, H, Dh), k/v (B, T, K, Dh) -> (B, T, H, Dh)."""
  b, t, h, d = q.shape
  kv_heads = k.shape[2]
  kernel = _kernel(t, h // kv_heads, causal, interpret, window, softcap)
  q = q * (d ** -0.5 if scale is None else scale)
  q = q.reshape(b, t, kv_heads, h // kv_heads, d).transpose(0, 2, 3, 1, 4)
  k, v = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # (B, K, T, Dh)

  def one_row(q, k, v, seg):  # q (K, G, T, Dh), k/v (K, T, Dh), seg (T,)
    ids = splash.SegmentIds(q=seg, kv=seg)
    return jax.vmap(lambda q, k, v: kernel(q, k, v, segment_ids=ids))(q, k, v)

  out = jax.vmap(one_row)(q, k, v, segment_ids)  # (B, K, G, T, Dh)
  return out.transpose(0, 3, 1, 2, 4).reshape(b, t, h, d)


def _dividing(mesh: jax.sharding.AbstractMesh, axes: Any, size: int) -> Any:
  """`axes` if they split `size` evenly, else None (replicated: e.g. init's batch of 1)."""
  names = axes if isinstance(axes, tuple) else (axes,)
  total = math.prod(mesh.shape[a] for a in names if a is not None)
  return axes if size % total == 0 else None


def splash_attention(q: Array, k: Array, v: Array, segment_ids: Array, causal: bool,
                     prefix_len: Array | None = None, window: int | None = None,
                     scale: float | None = None, softcap: float = 0.0) -> Array:
  """q (B, T, H, Dh); k, v (B, T, K, Dh); segment_ids (B, T), 0 = padding -> (B, T, H, Dh).
  `window` (a static int, causal): sliding-window attention; `scale` of the scores
  (default 1/sqrt(Dh)); `softcap`: c tanh(scores / c), the kernel's own."""
  if prefix_len is not None:
    raise ValueError("model.attention_impl=splash cannot express a prefix-LM mask (the kernel's "
                     "mask is fixed at compile time, prefix lengths are per example); use "
                     "model.attention_impl=blockwise")
  t = q.shape[1]
  pad = -t % MIN_BLOCK
  if pad:  # padded positions get segment id 0: no real token sees them
    widths = lambda x: [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2)
    q, k, v, segment_ids = (jnp.pad(x, widths(x)) for x in (q, k, v, segment_ids))
  mesh = jax.sharding.get_abstract_mesh()
  on_tpu = not mesh.empty and mesh.abstract_device.platform == "tpu"
  local = functools.partial(_local, causal=causal,
                            interpret=not (on_tpu or jax.default_backend() == "tpu"),
                            window=window if causal else None, scale=scale, softcap=softcap)
  if not mesh.empty:
    batch, length, heads, _ = nn.logical_to_mesh_axes(("batch", "length", "heads", "kv"))
    if length is not None:
      raise ValueError("model.attention_impl=splash does not support a sharded sequence "
                       "(mesh.rules maps 'length' to a mesh axis)")
    batch, heads = _dividing(mesh, batch, q.shape[0]), _dividing(mesh, heads, k.shape[2])
    rows, qkv = PartitionSpec(batch, None), PartitionSpec(batch, None, heads, None)
    local = jax.shard_map(local, mesh=mesh, in_specs=(qkv, qkv, qkv, rows), out_specs=qkv,
                          check_vma=False)
  return local(q, k, v, segment_ids)[:, :t]
