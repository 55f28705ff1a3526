"""One attention function with several implementations, and the attention layer.

Masks (`MaskSpec`, dense masks, the decoding cache's) live in `lmjax.model.masks`.
A layer is global or local (sliding window); its kind is a Python bool, or data when a
scanned stack mixes both (Gemma 2, 3): then every implementation takes it as a traced
flag, the blockwise one as a traced window size, the static kernels (splash, cuDNN)
through a `lax.cond` between their two variants.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from lmjax.model.blockwise import blockwise_attention
from lmjax.model.config import TransformerConfig
from lmjax.model.layers import Norm, dense
from lmjax.model.masks import (CacheMask, DenseMasks, MaskSpec, layer_mask,  # noqa: F401
                               make_attention_mask, write_rows)
from lmjax.model.rope import apply_rope, layer_frequencies

Array = jax.Array
DENSE_IMPLEMENTATIONS = ("reference", "xla", "cudnn")
NO_WINDOW = 1 << 30  # a global layer's "window" where the window is data


def resolve_implementation(name: str, dtype: jnp.dtype, prefix_lm: bool,
                           softcap: bool = False) -> str:
  """`auto`: splash on TPU (XLA for prefix-LM masks, which splash cannot express), cuDNN
  flash attention on GPU in half precision (XLA where scores are soft-capped, which cuDNN
  cannot do), blockwise elsewhere (CPU, GPU in float32). Blockwise beat XLA's dense path
  on CPU at every length measured, 128 to 2048 tokens (docs/performance.md)."""
  if name != "auto":
    return name
  backend = jax.default_backend()
  if backend == "tpu":
    return "xla" if prefix_lm else "splash"
  if backend == "gpu" and jnp.dtype(dtype).itemsize == 2:
    return "xla" if softcap else "cudnn"
  return "blockwise"


def _scores(logits: Array, d: int, scale: float | None, softcap: float) -> Array:
  """Raw q.k -> scaled (1/sqrt(d) unless `scale`) and soft-capped scores, float32."""
  logits = logits * (d ** -0.5 if scale is None else scale)
  return softcap * jnp.tanh(logits / softcap) if softcap else logits


def reference_attention(q: Array, k: Array, v: Array, mask: Array, scale: float | None = None,
                        softcap: float = 0.0) -> Array:
  """Plain einsum attention with grouped KV heads; softmax in float32.

  q: (B, T, H, Dh); k, v: (B, S, K, Dh) with H a multiple of K; mask (B, 1, T, S).
  `scale`: of the scores (default 1/sqrt(Dh)); `softcap`: scores -> c tanh(scores / c).
  """
  b, t, h, d = q.shape
  kv_heads = k.shape[2]
  q = q.reshape(b, t, kv_heads, h // kv_heads, d)  # (B, T, K, G, Dh)
  logits = jnp.einsum("btkgd,bskd->bkgts", q, k, preferred_element_type=jnp.float32)
  logits = _scores(logits, d, scale, softcap)
  logits = jnp.where(mask[:, :, None], logits, jnp.finfo(jnp.float32).min)  # (B, K, G, T, S)
  probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
  out = jnp.einsum("bkgts,bskd->btkgd", probs, v)  # (B, T, K, G, Dh)
  return out.reshape(b, t, h, d)


def cached_attention(q: Array, k_t: Array, v: Array, mask: Array, scale: float | None = None,
                     softcap: float = 0.0) -> Array:
  """Attention over a KV cache in the layouts its two matmuls read in place.

  q (B, T, H, Dh); k_t: keys transposed, (B, K, Dh, L); v (B, K, L, Dh); mask
  (B, 1, T, L). Decoding otherwise transposes the whole cache for every new token.
  """
  b, t, h, d = q.shape
  kv_heads = k_t.shape[1]
  q = q.reshape(b, t, kv_heads, h // kv_heads, d)  # (B, T, K, G, Dh)
  logits = jnp.einsum("btkgd,bkds->bkgts", q, k_t, preferred_element_type=jnp.float32)
  logits = jnp.where(mask[:, :, None], _scores(logits, d, scale, softcap),
                     jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)  # (B, K, G, T, L)
  return jnp.einsum("bkgts,bksd->btkgd", probs, v).reshape(b, t, h, d)


def window_blocks(window: int | None) -> int:
  """Blockwise's block size: 512 (measured best for causal rows on CPU), and for a sliding
  window the power of two up to half of it (at least 128), so that the blocks a query block
  visits hold little outside its window (benchmarks/window.py)."""
  if not window:
    return 512
  return min(512, max(128, 1 << max(window // 2, 1).bit_length() - 1))


def _static(fn, window: int | None, local: bool | Array):
  """fn(window) for a layer of static kind; a lax.cond between both variants otherwise."""
  if isinstance(local, bool):
    return fn(window if local else None)
  return jax.lax.cond(local, lambda: fn(window), lambda: fn(None))


def _blockwise(q: Array, k: Array, v: Array, spec: MaskSpec, matmul_dtype, window: int | None,
               local: bool | Array, scale: float | None, softcap: float) -> Array:
  """Blockwise attention with the window as an int (static loop bounds), or as data for a
  layer whose kind is data (NO_WINDOW on global layers); blocks sized for the window."""
  blocks = window_blocks(None if local is False else window)  # static, whatever the layer
  if window is not None and not isinstance(local, bool):
    window = jnp.where(local, window, NO_WINDOW)
  elif local is False:
    window = None
  return blockwise_attention(q, k, v, spec.segment_ids, spec.causal, spec.prefix_len, blocks,
                             blocks, matmul_dtype, window, scale, softcap)


def attention(q: Array, k: Array, v: Array, mask: MaskSpec | Array, implementation: str,
              matmul_dtype: jnp.dtype | None = None, window: int | None = None,
              local: bool | Array = True, scale: float | None = None,
              softcap: float = 0.0) -> Array:
  """q (B, T, H, Dh), k/v (B, S, K, Dh) -> (B, T, H, Dh) by `implementation`: blockwise,
  splash (from a MaskSpec), reference, or `jax.nn.dot_product_attention` (xla, cudnn).
  `matmul_dtype` (bfloat16_matmuls): blockwise's matmul operands on short rows. `window`
  applies where `local` (a bool, or a traced one); a dense mask given as an array already
  holds it (cuDNN is told as well, to skip). `scale`, `softcap`: see reference_attention."""
  if implementation in ("blockwise", "splash"):
    if not isinstance(mask, MaskSpec):
      raise ValueError(f"attention_impl={implementation} needs a MaskSpec, not a dense mask")
    if implementation == "blockwise":
      return _blockwise(q, k, v, mask, matmul_dtype, window, local, scale, softcap)
    from lmjax.model.splash import splash_attention  # Pallas: imported only when used
    return _static(lambda w: splash_attention(q, k, v, mask.segment_ids, mask.causal,
                                              mask.prefix_len, w, scale, softcap), window, local)
  if isinstance(mask, MaskSpec):
    mask = layer_mask(DenseMasks(mask.dense(), mask.dense(window)) if window else mask.dense(),
                      local)
  if implementation == "reference" or (implementation == "xla" and softcap):
    return reference_attention(q, k, v, mask, scale, softcap)  # XLA's has no soft-capping
  if softcap:
    raise ValueError(f"attention_impl={implementation} cannot soft-cap scores "
                     "(model.attn_softcap); use xla, blockwise or splash")
  if implementation == "xla" or window is None:
    return jax.nn.dot_product_attention(q, k, v, mask=mask, scale=scale,
                                        implementation=implementation)
  return _static(lambda w: jax.nn.dot_product_attention(  # cuDNN skips what is outside
      q, k, v, mask=mask, scale=scale, implementation=implementation,
      local_window_size=None if w is None else (w - 1, 0)), window, local)


def _window_slots(k_t: Array, v: Array, mask: Array, start: Array, window: int):
  """The `window` cache slots that end at each row's new token (slot `start` (B,)): what a
  local layer's decoding step reads instead of the whole cache."""
  first = jnp.clip(start - window + 1, 0, k_t.shape[-1] - window)  # (B,)
  take = lambda a, axis: jax.vmap(
      lambda row, i: jax.lax.dynamic_slice_in_dim(row, i, window, axis))(a, first)
  return take(k_t, 2), take(v, 1), take(mask, 2)  # (B, K, Dh, W), (B, K, W, Dh), (B, 1, 1, W)


class MultiHeadAttention(nn.Module):
  """Multi-head attention with `num_kv_heads` KV heads (MHA, GQA or MQA).

  With `decode`, keys and values are appended to a preallocated cache (the
  "cache" collection) and the new queries attend over all of it, or on a local
  layer over its window.
  """

  cfg: TransformerConfig
  deterministic: bool = True
  decode: bool = False

  @nn.compact
  def __call__(self, x: Array, mask, positions: Array, local: bool | Array = False) -> Array:
    """x (B, T, D); mask: a MaskSpec or dense mask(s) (`masks.layer_mask`), or when decoding
    the (B, 1, T, L) cache mask(s); local: whether this layer is a sliding-window one."""
    cfg = self.cfg
    q, k, v = self._project(x)  # (B, T, H, Dh), (B, T, K, Dh) x 2
    if cfg.position == "rope":
      inv_freq, factor = layer_frequencies(cfg, local)
      q, k = apply_rope(q, positions, inv_freq, factor), apply_rope(k, positions, inv_freq, factor)
    if cfg.query_mult != 1.0:  # µP: scores scale as 1/head_dim
      q = q * jnp.asarray(cfg.query_mult, q.dtype)
    mask = layer_mask(mask, local)
    window = cfg.sliding_window or None
    if self.decode:
      out = self._decode(q, k, v, mask, local)  # (B, T, H, Dh)
    else:
      # A dense mask means the stack chose a dense implementation; say so to `auto`.
      prefix_lm = not isinstance(mask, MaskSpec) or mask.prefix_len is not None
      impl = resolve_implementation(cfg.attention_impl, cfg.compute_dtype, prefix_lm,
                                    bool(cfg.attn_softcap))
      out = attention(q, k, v, mask, impl, cfg.matmul_dtype, window, local,
                      cfg.attention_scale, cfg.attn_softcap)  # (B, T, H, Dh)
    out = checkpoint_name(out, "attention_out")  # kept by remat policy save_attention_out
    out = nn.with_logical_constraint(out, ("batch", "length", "heads", "kv"))
    # Residual-stream projections get GPT-2's depth-scaled init.
    std = cfg.init_std / (2 * cfg.num_layers) ** 0.5
    y = dense(cfg, cfg.d_model, 2, ("heads", "kv", "embed"), ("embed",), "out", std)(out)
    return nn.Dropout(cfg.dropout_rate)(y, deterministic=self.deterministic)  # (B, T, D)

  def _project(self, x: Array) -> tuple[Array, Array, Array]:
    """Queries, keys and values, with their biases (use_bias or qkv_bias) and norms."""
    cfg = self.cfg
    dh, bias = cfg.dim_per_head, cfg.use_bias or cfg.qkv_bias
    proj = lambda n, name: dense(cfg, (n, dh), 1, ("embed", "heads", "kv"), ("heads", "kv"),
                                 name, bias=bias)
    q = proj(cfg.num_heads, "query")(x)  # (B, T, H, Dh)
    k = proj(cfg.kv_heads, "key")(x)  # (B, T, K, Dh)
    v = proj(cfg.kv_heads, "value")(x)  # (B, T, K, Dh)
    if cfg.qk_norm == "head":  # over each head's Dh (Qwen3, Gemma 3)
      q, k = Norm(cfg, "kv", name="query_norm")(q), Norm(cfg, "kv", name="key_norm")(k)
    elif cfg.qk_norm == "projection":  # over all heads at once (OLMo 2)
      whole = lambda a, name: Norm(cfg, None, name=name)(
          a.reshape(*a.shape[:2], -1)).reshape(a.shape)
      q, k = whole(q, "query_norm"), whole(k, "key_norm")
    return q, k, v

  def _decode(self, q: Array, k: Array, v: Array, mask: Array, local: bool | Array) -> Array:
    """Appends k, v to the cache; the new queries attend over it. A local layer's one-token
    step reads only its window's slots (the mask already limits longer calls)."""
    cfg = self.cfg
    k_t, v, start = self._cached(k, v, mask)
    window = cfg.sliding_window
    if local is True and start is not None and q.shape[1] == 1 and window < k_t.shape[-1]:
      k_t, v, mask = _window_slots(k_t, v, mask, start, window)
    return cached_attention(q, k_t, v, mask, cfg.attention_scale, cfg.attn_softcap)

  def _cached(self, k: Array, v: Array, mask: Array) -> tuple[Array, Array, Array | None]:
    """Writes the new (B, T, K, Dh) keys/values at each row's cache index; returns the whole
    cache as `cached_attention` reads it, keys (B, K, Dh, L) and values (B, K, L, Dh), and
    the slot of each row's first new token (B,) (None on the call that sizes the cache)."""
    k, v = k.transpose(0, 2, 3, 1), v.transpose(0, 2, 1, 3)
    ready = self.has_variable("cache", "cached_key")
    cached_k = self.variable("cache", "cached_key", jnp.zeros, k.shape, k.dtype)
    cached_v = self.variable("cache", "cached_value", jnp.zeros, v.shape, v.dtype)
    index = self.variable("cache", "index", jnp.zeros, k.shape[:1], jnp.int32)
    if not ready:
      return k, v, None
    start = index.value
    cached_k.value = write_rows(cached_k.value, k, start, axis=3)
    cached_v.value = write_rows(cached_v.value, v, start, axis=2)
    # A real query sees at least itself: the row's real tokens advance its index.
    index.value = start + mask[:, 0].any(-1).sum(axis=1, dtype=jnp.int32)
    return cached_k.value, cached_v.value, start
