"""Who may attend to whom: masks for training and for decoding with a KV cache.

A `MaskSpec` describes a mask before it is built: segment ids (0 = padding, equal ids =
same packed document), a causal flag, and an optional prefix length (prefix-LM: the
prefix attends bidirectionally, the rest causally). The blockwise and splash
implementations read the spec and never build a (T, S) mask; the dense ones
(`reference`, `xla`, `cudnn`) get it as a boolean (B, 1, T, S) array, True = may attend,
which broadcasts over heads.

A sliding window (`sliding_window` W) lets a query see only the W keys ending at itself,
key index > query index - W, as transformers' `sliding_window_overlay`. A model whose
layers mix local and global attention gives dense implementations both masks
(`DenseMasks`), and each layer picks its own.
"""

from __future__ import annotations

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

Array = jax.Array


def make_attention_mask(segment_ids: Array, causal: bool,
                        prefix_len: Array | None = None,
                        kv_segment_ids: Array | None = None,
                        window: int | None = None) -> Array:
  """(B, T) segment ids [, (B,) prefix lengths] -> (B, 1, T, S) bool mask. `window`
  (causal only): a query sees the `window` keys ending at itself."""
  kv = segment_ids if kv_segment_ids is None else kv_segment_ids
  q_seg, k_seg = segment_ids[:, :, None], kv[:, None, :]  # (B, T, 1), (B, 1, S)
  mask = (q_seg == k_seg) & (q_seg != 0) & (k_seg != 0)  # padding and documents
  if causal:
    q_idx = jnp.arange(segment_ids.shape[1])[:, None]
    k_idx = jnp.arange(kv.shape[1])[None, :]
    allowed = k_idx <= q_idx  # (T, S)
    if prefix_len is not None:
      allowed = allowed | (k_idx[None] < prefix_len[:, None, None])  # (B, T, S)
    if window is not None:
      allowed = allowed & (k_idx > q_idx - window)
    mask = mask & allowed
  return mask[:, None]


@flax.struct.dataclass
class MaskSpec:
  """A mask before it is built: (B, T) segment ids, (B,) prefix lengths or None, causal."""

  segment_ids: Array
  prefix_len: Array | None
  causal: bool = flax.struct.field(pytree_node=False)

  def dense(self, window: int | None = None) -> Array:
    return make_attention_mask(self.segment_ids, self.causal, self.prefix_len,
                               window=window)  # (B, 1, T, T)


@flax.struct.dataclass
class DenseMasks:
  """The two dense masks of a model whose layers mix global and local attention."""

  full: Array  # (B, 1, T, S)
  local: Array  # (B, 1, T, S), within the sliding window

  def pick(self, local: bool | Array) -> Array:
    """The mask of a layer whose kind is a Python bool or data (a scanned stack)."""
    if isinstance(local, bool):
      return self.local if local else self.full
    return jnp.where(local, self.local, self.full)


def layer_mask(mask, local: bool | Array):
  """A layer's mask from what the stack passes: a MaskSpec, one dense mask, or both."""
  return mask.pick(local) if isinstance(mask, DenseMasks) else mask


class CacheMask(nn.Module):
  """Decoding: which cache slots each new token may attend to.

  The cache has L slots per row (the length of the call that created it); each
  call writes a row's T tokens at that row's own `index` and advances it by the
  row's real tokens (segment id != 0), so rows of one batch may hold sequences
  of different lengths (continuous batching). Padding after a row's real tokens
  is written but not counted: the next call overwrites it. A slot is visible if
  it holds a real token at or before the query's own slot, and, for local layers
  (`window`), fewer than `window` slots before it. `mixed`: return both masks.
  """

  window: int = 0
  mixed: bool = False

  @nn.compact
  def __call__(self, segment_ids: Array) -> Array | DenseMasks:
    """(B, T) segment ids of the new tokens -> (B, 1, T, L) bool mask(s)."""
    ready = self.has_variable("cache", "valid")
    valid = self.variable("cache", "valid", jnp.zeros, segment_ids.shape, jnp.bool_)
    index = self.variable("cache", "index", jnp.zeros, segment_ids.shape[:1], jnp.int32)
    if not ready:  # the call that sizes the cache is an ordinary forward pass
      full = make_attention_mask(segment_ids, causal=True)
      local = make_attention_mask(segment_ids, causal=True, window=self.window or None)
    else:
      t, slots = segment_ids.shape[1], valid.value.shape[1]
      real = segment_ids != 0  # (B, T)
      valid.value = write_rows(valid.value, real, index.value, axis=1)
      q_slot = index.value[:, None] + jnp.arange(t)  # (B, T)
      mask = valid.value[:, None, :] & (jnp.arange(slots) <= q_slot[:, :, None])  # (B, T, L)
      index.value = index.value + real.sum(axis=1, dtype=jnp.int32)
      full = (mask & real[:, :, None])[:, None]  # (B, 1, T, L)
      recent = jnp.arange(slots) > q_slot[:, :, None] - self.window  # (B, T, L)
      local = full & recent[:, None] if self.window else full
    if self.mixed:
      return DenseMasks(full, local)
    return local if self.window else full


def write_rows(cache: Array, new: Array, index: Array, axis: int) -> Array:
  """Writes each row's `new` values into `cache` along `axis`, from that row's `index`
  (B,). Rows are independent: each may sit at a different length."""
  def one(c, n, i):
    start = [0] * c.ndim
    start[axis - 1] = i
    return jax.lax.dynamic_update_slice(c, n, start)
  return jax.vmap(one)(cache, new.astype(cache.dtype), index)
