"""Attention masks, one attention function with several implementations, and the layer.

Who may attend to whom is described by a `MaskSpec`: segment ids (0 = padding,
equal ids = same packed document), a causal flag, and an optional prefix length
(prefix-LM: the prefix attends bidirectionally, the rest causally). The blockwise
and splash implementations read the spec and never build a (T, S) mask; the
dense ones (`reference`, `xla`, `cudnn`) get it as a boolean (B, 1, T, S) array,
True = may attend, which broadcasts over heads.
"""

from __future__ import annotations

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from lmjax.model.blockwise import blockwise_attention
from lmjax.model.config import TransformerConfig
from lmjax.model.layers import dense, rope

Array = jax.Array
DENSE_IMPLEMENTATIONS = ("reference", "xla", "cudnn")


def make_attention_mask(segment_ids: Array, causal: bool,
                        prefix_len: Array | None = None,
                        kv_segment_ids: Array | None = None) -> Array:
  """(B, T) segment ids [, (B,) prefix lengths] -> (B, 1, T, S) bool mask."""
  kv = segment_ids if kv_segment_ids is None else kv_segment_ids
  q_seg, k_seg = segment_ids[:, :, None], kv[:, None, :]  # (B, T, 1), (B, 1, S)
  mask = (q_seg == k_seg) & (q_seg != 0) & (k_seg != 0)  # padding and documents
  if causal:
    q_idx = jnp.arange(segment_ids.shape[1])[:, None]
    k_idx = jnp.arange(kv.shape[1])[None, :]
    allowed = k_idx <= q_idx  # (T, S)
    if prefix_len is not None:
      allowed = allowed | (k_idx[None] < prefix_len[:, None, None])  # (B, T, S)
    mask = mask & allowed
  return mask[:, None]


@flax.struct.dataclass
class MaskSpec:
  """A mask before it is built: (B, T) segment ids, (B,) prefix lengths or None, causal."""

  segment_ids: Array
  prefix_len: Array | None
  causal: bool = flax.struct.field(pytree_node=False)

  def dense(self) -> Array:
    return make_attention_mask(self.segment_ids, self.causal, self.prefix_len)  # (B, 1, T, T)


def resolve_implementation(name: str, dtype: jnp.dtype, prefix_lm: bool) -> str:
  """`auto`: splash on TPU (XLA for prefix-LM masks, which splash cannot express), cuDNN
  flash attention on GPU in half precision, blockwise elsewhere (CPU, GPU in float32).
  Blockwise beat XLA's dense path on CPU at every length measured, 128 to 2048 tokens
  (docs/performance.md)."""
  if name != "auto":
    return name
  backend = jax.default_backend()
  if backend == "tpu":
    return "xla" if prefix_lm else "splash"
  if backend == "gpu" and jnp.dtype(dtype).itemsize == 2:
    return "cudnn"
  return "blockwise"


def reference_attention(q: Array, k: Array, v: Array, mask: Array) -> Array:
  """Plain einsum attention with grouped KV heads; softmax in float32.

  q: (B, T, H, Dh); k, v: (B, S, K, Dh) with H a multiple of K; mask (B, 1, T, S).
  """
  b, t, h, d = q.shape
  kv_heads = k.shape[2]
  q = q.reshape(b, t, kv_heads, h // kv_heads, d)  # (B, T, K, G, Dh)
  logits = jnp.einsum("btkgd,bskd->bkgts", q, k, preferred_element_type=jnp.float32)
  logits = logits * (d ** -0.5)
  logits = jnp.where(mask[:, :, None], logits, jnp.finfo(jnp.float32).min)  # (B, K, G, T, S)
  probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
  out = jnp.einsum("bkgts,bskd->btkgd", probs, v)  # (B, T, K, G, Dh)
  return out.reshape(b, t, h, d)


def cached_attention(q: Array, k_t: Array, v: Array, mask: Array) -> Array:
  """Attention over a KV cache in the layouts its two matmuls read in place.

  q (B, T, H, Dh); k_t: keys transposed, (B, K, Dh, L); v (B, K, L, Dh); mask
  (B, 1, T, L). Decoding otherwise transposes the whole cache for every new token.
  """
  b, t, h, d = q.shape
  kv_heads = k_t.shape[1]
  q = q.reshape(b, t, kv_heads, h // kv_heads, d)  # (B, T, K, G, Dh)
  logits = jnp.einsum("btkgd,bkds->bkgts", q, k_t, preferred_element_type=jnp.float32)
  logits = jnp.where(mask[:, :, None], logits * (d ** -0.5), jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)  # (B, K, G, T, L)
  return jnp.einsum("bkgts,bksd->btkgd", probs, v).reshape(b, t, h, d)


def attention(q: Array, k: Array, v: Array, mask: MaskSpec | Array, implementation: str,
              matmul_dtype: jnp.dtype | None = None) -> Array:
  """q (B, T, H, Dh), k/v (B, S, K, Dh) -> (B, T, H, Dh) by `implementation`: blockwise,
  splash (from a MaskSpec), reference, or `jax.nn.dot_product_attention` (xla, cudnn).
  `matmul_dtype` (bfloat16_matmuls): blockwise's matmul operands on short rows."""
  if implementation in ("blockwise", "splash"):
    if not isinstance(mask, MaskSpec):
      raise ValueError(f"attention_impl={implementation} needs a MaskSpec, not a dense mask")
    if implementation == "blockwise":
      return blockwise_attention(q, k, v, mask.segment_ids, mask.causal, mask.prefix_len,
                                 matmul_dtype=matmul_dtype)
    from lmjax.model.splash import splash_attention  # Pallas: imported only when used
    return splash_attention(q, k, v, mask.segment_ids, mask.causal, mask.prefix_len)
  if isinstance(mask, MaskSpec):
    mask = mask.dense()
  if implementation == "reference":
    return reference_attention(q, k, v, mask)
  return jax.nn.dot_product_attention(q, k, v, mask=mask, implementation=implementation)


class CacheMask(nn.Module):
  """Decoding: which cache slots each new token may attend to.

  The cache has L slots per row (the length of the call that created it); each
  call writes a row's T tokens at that row's own `index` and advances it by the
  row's real tokens (segment id != 0), so rows of one batch may hold sequences
  of different lengths (continuous batching). Padding after a row's real tokens
  is written but not counted: the next call overwrites it. A slot is visible if
  it holds a real token at or before the query's own slot.
  """

  @nn.compact
  def __call__(self, segment_ids: Array) -> Array:
    """(B, T) segment ids of the new tokens -> (B, 1, T, L) bool mask."""
    ready = self.has_variable("cache", "valid")
    valid = self.variable("cache", "valid", jnp.zeros, segment_ids.shape, jnp.bool_)
    index = self.variable("cache", "index", jnp.zeros, segment_ids.shape[:1], jnp.int32)
    if not ready:  # the call that sizes the cache is an ordinary forward pass
      return make_attention_mask(segment_ids, causal=True)
    t, slots = segment_ids.shape[1], valid.value.shape[1]
    real = segment_ids != 0  # (B, T)
    valid.value = write_rows(valid.value, real, index.value, axis=1)
    q_slot = index.value[:, None] + jnp.arange(t)  # (B, T)
    mask = valid.value[:, None, :] & (jnp.arange(slots) <= q_slot[:, :, None])  # (B, T, L)
    index.value = index.value + real.sum(axis=1, dtype=jnp.int32)
    return (mask & real[:, :, None])[:, None]  # (B, 1, T, L)


def write_rows(cache: Array, new: Array, index: Array, axis: int) -> Array:
  """Writes each row's `new` values into `cache` along `axis`, from that row's `index`
  (B,). Rows are independent: each may sit at a different length."""
  def one(c, n, i):
    start = [0] * c.ndim
    start[axis - 1] = i
    return jax.lax.dynamic_update_slice(c, n, start)
  return jax.vmap(one)(cache, new.astype(cache.dtype), index)


class MultiHeadAttention(nn.Module):
  """Multi-head attention with `num_kv_heads` KV heads (MHA, GQA or MQA).

  With `decode`, keys and values are appended to a preallocated cache (the
  "cache" collection) and the new queries attend over all of it.
  """

  cfg: TransformerConfig
  deterministic: bool = True
  decode: bool = False

  @nn.compact
  def __call__(self, x: Array, mask: MaskSpec | Array, positions: Array) -> Array:
    """x (B, T, D); mask: a MaskSpec, or when decoding the (B, 1, T, L) cache mask."""
    cfg = self.cfg
    heads, kv_heads, dh = cfg.num_heads, cfg.kv_heads, cfg.dim_per_head
    proj = lambda n, name: dense(cfg, (n, dh), 1, ("embed", "heads", "kv"), ("heads", "kv"), name)
    q = proj(heads, "query")(x)  # (B, T, H, Dh)
    k = proj(kv_heads, "key")(x)  # (B, T, K, Dh)
    v = proj(kv_heads, "value")(x)  # (B, T, K, Dh)
    if cfg.position == "rope":
      q, k = rope(q, positions, cfg.rope_theta), rope(k, positions, cfg.rope_theta)
    if cfg.query_mult != 1.0:  # µP: scores scale as 1/head_dim
      q = q * jnp.asarray(cfg.query_mult, q.dtype)
    if self.decode:
      out = cached_attention(q, *self._cached(k, v, mask), mask)  # (B, T, H, Dh)
    else:
      # A dense mask means the stack chose a dense implementation; say so to `auto`.
      prefix_lm = not isinstance(mask, MaskSpec) or mask.prefix_len is not None
      impl = resolve_implementation(cfg.attention_impl, cfg.compute_dtype, prefix_lm)
      out = attention(q, k, v, mask, impl, cfg.matmul_dtype)  # (B, T, H, Dh)
    out = checkpoint_name(out, "attention_out")  # kept by remat policy save_attention_out
    out = nn.with_logical_constraint(out, ("batch", "length", "heads", "kv"))
    # Residual-stream projections get GPT-2's depth-scaled init.
    std = cfg.init_std / (2 * cfg.num_layers) ** 0.5
    y = dense(cfg, cfg.d_model, 2, ("heads", "kv", "embed"), ("embed",), "out", std)(out)
    return nn.Dropout(cfg.dropout_rate)(y, deterministic=self.deterministic)  # (B, T, D)

  def _cached(self, k: Array, v: Array, mask: Array) -> tuple[Array, Array]:
    """Writes the new (B, T, K, Dh) keys/values at each row's cache index; returns the whole
    cache as `cached_attention` reads it: keys (B, K, Dh, L), values (B, K, L, Dh)."""
    k, v = k.transpose(0, 2, 3, 1), v.transpose(0, 2, 1, 3)
    ready = self.has_variable("cache", "cached_key")
    cached_k = self.variable("cache", "cached_key", jnp.zeros, k.shape, k.dtype)
    cached_v = self.variable("cache", "cached_value", jnp.zeros, v.shape, v.dtype)
    index = self.variable("cache", "index", jnp.zeros, k.shape[:1], jnp.int32)
    if not ready:
      return k, v
    cached_k.value = write_rows(cached_k.value, k, index.value, axis=3)
    cached_v.value = write_rows(cached_v.value, v, index.value, axis=2)
    # A real query sees at least itself: the row's real tokens advance its index.
    index.value = index.value + mask[:, 0].any(-1).sum(axis=1, dtype=jnp.int32)
    return cached_k.value, cached_v.value
