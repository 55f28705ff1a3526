"""Rotary position embeddings (LLaMA's rotate-half layout) and their context extensions.

A layer's rotation is fixed by its inverse frequencies (Dh/2,) and the factor its cos and
sin are scaled by. `default`: theta ** (-2i / Dh). The scalings follow Hugging Face's
`modeling_rope_utils` step by step, in float32: linear divides every frequency by the
factor (positions interpolated); llama3 divides the low frequencies, keeps the high ones
and blends the band between (Llama 3.1); yarn blends interpolated and original
frequencies per dimension by how many rotations it makes over the original context
(NTK-by-parts), and scales cos and sin by 0.1 ln(factor) + 1. Every value is a constant
of the config: XLA folds it.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from lmjax.model.config import TransformerConfig

Array = jax.Array


def _default(theta: float, half: int) -> Array:
  return 1.0 / theta ** (jnp.arange(half, dtype=jnp.float32) / half)  # (Dh/2,)


def _llama3(cfg: TransformerConfig, inv_freq: Array) -> Array:
  factor, old = cfg.rope_factor, cfg.rope_original_max_len
  low_wavelen = old / cfg.rope_low_freq_factor
  high_wavelen = old / cfg.rope_high_freq_factor
  wavelen = 2 * math.pi / inv_freq
  scaled = jnp.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
  smooth = (old / wavelen - cfg.rope_low_freq_factor) / (
      cfg.rope_high_freq_factor - cfg.rope_low_freq_factor)
  smoothed = (1 - smooth) * scaled / factor + smooth * scaled
  medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
  return jnp.where(medium, smoothed, scaled)


def _yarn(cfg: TransformerConfig, half: int) -> tuple[Array, float]:
  dim, base, factor = 2 * half, cfg.rope_theta, cfg.rope_factor
  old = cfg.rope_original_max_len

  def correction_dim(rotations: float) -> float:  # the dimension making that many turns
    return dim * math.log(old / (rotations * 2 * math.pi)) / (2 * math.log(base))

  low, high = correction_dim(cfg.rope_beta_fast), correction_dim(cfg.rope_beta_slow)
  if cfg.rope_truncate:
    low, high = math.floor(low), math.ceil(high)
  low, high = max(low, 0), min(high, dim - 1)
  if low == high:
    high += 0.001  # as transformers: no division by zero
  ramp = jnp.clip((jnp.arange(half, dtype=jnp.float32) - low) / (high - low), 0, 1)
  pos_freqs = base ** (jnp.arange(0, dim, 2, dtype=jnp.float32) / dim)
  extrapolation = 1 - ramp  # 1: the dimension keeps its frequency
  inv_freq = (1.0 / (factor * pos_freqs)) * (1 - extrapolation) + (1.0 / pos_freqs) * extrapolation
  attention = cfg.rope_attention_factor or (0.1 * math.log(factor) + 1.0 if factor > 1 else 1.0)
  return inv_freq, attention


def frequencies(cfg: TransformerConfig, local: bool) -> tuple[Array, float]:
  """A layer's inverse frequencies (Dh/2,) float32 and its cos/sin factor; `local`: a
  sliding-window layer, which has its own unscaled base when rope_local_theta is set."""
  half = cfg.dim_per_head // 2
  if local and cfg.rope_local_theta:
    return _default(cfg.rope_local_theta, half), 1.0
  if cfg.rope_scaling == "yarn":
    return _yarn(cfg, half)
  inv_freq = _default(cfg.rope_theta, half)
  if cfg.rope_scaling == "linear":
    return inv_freq / cfg.rope_factor, 1.0
  if cfg.rope_scaling == "llama3":
    return _llama3(cfg, inv_freq), 1.0
  return inv_freq, 1.0


def layer_frequencies(cfg: TransformerConfig, local: bool | Array) -> tuple[Array, float | Array]:
  """`frequencies` for a layer whose kind is a Python bool, or data (a scanned stack whose
  layers mix local and global): then both are computed and one is selected."""
  if isinstance(local, bool):
    return frequencies(cfg, local)
  (inv_l, scale_l), (inv_g, scale_g) = frequencies(cfg, True), frequencies(cfg, False)
  scale = scale_g if scale_l == scale_g else jnp.where(local, scale_l, scale_g)
  return jnp.where(local, inv_l, inv_g), scale


def apply_rope(x: Array, positions: Array, inv_freq: Array, scale: float | Array = 1.0) -> Array:
  """Rotates x (B, T, H, Dh) by positions (B, T); cos and sin times `scale` (yarn)."""
  angles = positions.astype(jnp.float32)[..., None] * inv_freq  # (B, T, Dh/2)
  cos = jnp.cos(angles)[:, :, None, :]  # (B, T, 1, Dh/2)
  sin = jnp.sin(angles)[:, :, None, :]
  if not (isinstance(scale, float) and scale == 1.0):
    cos, sin = cos * scale, sin * scale
  x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x.dtype)
