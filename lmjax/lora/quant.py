"""The frozen base kept quantized (QLoRA): per-channel int8, or NF4 with double quantization.

int8: each output channel of a kernel keeps int8 values and one float32 scale
(max |w| / 127 over the channel's inputs). NF4 (Dettmers et al., 2023): the kernel in
blocks of 64, each stored as 4-bit indices into the NormalFloat code book scaled by
the block's absmax; the absmaxes themselves quantized again (double quantization) as
int8 in blocks of 256 around their mean. Written here in plain jax.numpy (a few dozen
lines) rather than through a library: bitsandbytes is CUDA-only and torch-bound, and no
maintained JAX package offers NF4 for Flax Linen parameter trees. A quantized layer is
dequantized inside its own matmul (`LoraModel`), so only one layer's float kernel
exists at a time. Leaves replace `kernel` in the dense layer's scope and shard as it does:
int8 codes exactly as the kernel; NF4 codes (and absmaxes) along its first axis, and the
codes along its second, where every row of the first axis holds whole blocks.
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

NF4_CODE = (-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
            -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
            0.07958029955625534, 0.16093020141124725, 0.24611230194568634,
            0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
            0.7229568362236023, 1.0)
BLOCK, ABSMAX_BLOCK = 64, 256


def is_quantized(node: Any) -> bool:
  return "kernel_q" in node or "kernel_nf4" in node


def quantize(kernel: Any, n_lead: int, n_in: int, kind: str) -> dict[str, Any]:
  """The leaves that replace a float `kernel` (`n_lead` stacked-layer axes, then `n_in`
  input axes); boxed kernels give them logical axes."""
  boxed = isinstance(kernel, nn.Partitioned)
  w = jnp.asarray(kernel.value if boxed else kernel, jnp.float32)
  leaves = _int8(w, n_lead, n_in) if kind == "int8" else _nf4(w, n_lead)
  if not boxed:
    return leaves
  names = kernel.names
  if kind == "int8":
    axes = {"kernel_q": names, "kernel_scale": (*names[:n_lead], *(None,) * n_in,
                                                *names[n_lead + n_in:])}
  else:
    axes = {k: (*names[:n_lead], *(None,) * (v.ndim - n_lead)) for k, v in leaves.items()}
    if leaves["kernel_nf4"].ndim == n_lead + 2:  # rows: the kernel's first axis
      first, second = names[n_lead], names[n_lead + 1]
      # A row's packed codes are its other axes flattened, outermost first: a shard of
      # them along `second` is a shard of the kernel's axis there, as the float base's.
      axes["kernel_nf4"] = (*names[:n_lead], first, second)
      axes["kernel_absmax_q"] = (*names[:n_lead], first, None)
  return {k: nn.Partitioned(v, axes[k]) for k, v in leaves.items()}


def _int8(w: Any, n_lead: int, n_in: int) -> dict[str, Any]:
  axes = tuple(range(n_lead, n_lead + n_in))
  scale = jnp.max(jnp.abs(w), axis=axes, keepdims=True) / 127.0
  scale = jnp.where(scale == 0, 1.0, scale)
  q = jnp.clip(jnp.round(w / scale), -127, 127).astype(jnp.int8)
  return {"kernel_q": q, "kernel_scale": scale.astype(jnp.float32)}


def _nf4(w: Any, n_lead: int) -> dict[str, Any]:
  lead = w.shape[:n_lead]
  flat = w.reshape(*lead, -1)
  size = flat.shape[-1]
  if size % (2 * BLOCK):
    flat = jnp.pad(flat, [(0, 0)] * n_lead + [(0, -size % (2 * BLOCK))])
  blocks = flat.reshape(*lead, -1, BLOCK)
  absmax = jnp.max(jnp.abs(blocks), axis=-1)
  absmax = jnp.where(absmax == 0, 1.0, absmax)
  code = jnp.asarray(NF4_CODE, jnp.float32)
  middles = (code[1:] + code[:-1]) / 2  # the nearest code: searchsorted, O(n) memory
  idx = jnp.searchsorted(middles, blocks / absmax[..., None])
  idx = idx.astype(jnp.uint8).reshape(*lead, -1, 2)
  packed = (idx[..., 0] << 4) | idx[..., 1]
  mean = jnp.mean(absmax, axis=-1, keepdims=True)
  centred = absmax - mean
  n = centred.shape[-1]
  centred = jnp.pad(centred, [(0, 0)] * n_lead + [(0, -n % ABSMAX_BLOCK)])
  groups = centred.reshape(*lead, -1, ABSMAX_BLOCK)
  scale2 = jnp.max(jnp.abs(groups), axis=-1, keepdims=True) / 127.0
  scale2 = jnp.where(scale2 == 0, 1.0, scale2)
  q2 = jnp.clip(jnp.round(groups / scale2), -127, 127).astype(jnp.int8)
  absmax_q = q2.reshape(*lead, -1)[..., :n]
  rows, row = w.shape[n_lead], math.prod(w.shape[n_lead + 1:])
  if row % BLOCK == 0 and size % (2 * BLOCK) == 0:
    # whole blocks per row of the kernel's first axis: the codes keep that axis (and shard
    # as the float kernel does); the flat order, and so dequantize, is the same
    packed, absmax_q = packed.reshape(*lead, rows, -1), absmax_q.reshape(*lead, rows, -1)
  return {"kernel_nf4": packed, "kernel_absmax_q": absmax_q,
          "kernel_absmax_scale": scale2[..., 0], "kernel_absmax_mean": mean}


def dequantize(node: Any, dtype: Any) -> Any:
  """One layer's float kernel (flat for NF4: the caller reshapes it) from its leaves."""
  if "kernel_q" in node:
    return (node["kernel_q"].astype(jnp.float32) * node["kernel_scale"]).astype(dtype)
  packed = node["kernel_nf4"]
  idx = jnp.stack([packed >> 4, packed & 15], axis=-1).reshape(-1).astype(jnp.int32)
  q2 = node["kernel_absmax_q"].astype(jnp.float32).reshape(-1)
  n = q2.shape[-1]
  scale2 = jnp.repeat(node["kernel_absmax_scale"], ABSMAX_BLOCK)[:n]
  absmax = q2 * scale2 + node["kernel_absmax_mean"]
  code = jnp.asarray(NF4_CODE, jnp.float32)
  w = (code[idx].reshape(-1, BLOCK) * absmax[:, None]).reshape(-1)
  return w.astype(dtype)


def quantize_tree(params: dict[str, Any], layers: dict[str, Any], kind: str
                  ) -> dict[str, Any]:
  """`params` with the kernels of `layers` ({name: DenseInfo}) quantized as `kind`."""
  out = dict(params)
  for name, info in layers.items():
    keys = name.split("/")
    node = out
    for key in keys:
      node[key] = dict(node[key])
      node = node[key]
    kernel = node.pop("kernel")
    value = kernel.value if isinstance(kernel, nn.Partitioned) else kernel
    n_lead = value.ndim - len(info.in_shape) - len(info.features)
    node.update(quantize(kernel, n_lead, len(info.in_shape), kind))
  return out
