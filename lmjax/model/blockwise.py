"""Blockwise attention: exact attention in memory linear in T, for backends without a
fused kernel (CPU, and GPU in float32).

The queries are cut into blocks of `block_q` positions and the keys into blocks of
`block_k`; each query block walks the key blocks with an online softmax (running
max `m`, normaliser `l`, weighted sum `acc`), so no (T, S) score matrix exists.
Key blocks entirely above the causal diagonal are never visited (the loop bound),
and blocks in which no query may see any key (another packed document, padding)
are skipped by a `lax.cond`. A sliding window (a query sees the `window` keys ending at
itself) bounds the loop from below as the diagonal bounds it from above, so a query block
visits about window / block_k + 1 key blocks whatever the length. The backward pass
recomputes the probabilities block by block from the saved log-sum-exp
(FlashAttention-2), so the forward pass keeps only q, k, v, the output and one float per
query and head. Rows short enough to be one
block (`SAVED_PROBS_MAX_LEN`) keep their probabilities instead: cheaper than recomputing.

Layout: the G query heads that share a KV head are folded into the rows of a
query block, (B, K, bq * G, Dh), so every matmul is a plain batched (B, K) matmul
whatever the grouping (MHA, GQA, MQA). The backward pass works on transposed
scores (keys x queries): on CPU that keeps all five matmuls free of transposes.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

Array = jax.Array
_NEG = -1e30  # finite "minus infinity": exp(_NEG - m) underflows to 0 without NaNs


def _block_mask(q_seg: Array, k_seg: Array, q_start: Array | int, k_start: Array | int,
                groups: int, causal: bool, prefix_len: Array | None, window: Array | None,
                keys_first: bool = False) -> Array:
  """Segment ids (B, bq), (B, bk) and block offsets -> (B, 1, bq * G, bk) bool mask,
  or (B, 1, bk, bq * G) with `keys_first` (the backward pass's transposed scores)."""
  q_seg, k_seg = jnp.repeat(q_seg, groups, axis=1), k_seg  # a row per (position, head)
  q_pos = q_start + jnp.arange(q_seg.shape[1]) // groups
  k_pos = k_start + jnp.arange(k_seg.shape[1])
  if keys_first:  # build it transposed rather than transpose it: no copy
    mask = (k_seg[:, :, None] == q_seg[:, None, :]) & (q_seg[:, None, :] != 0)
    allowed = k_pos[:, None] <= q_pos[None, :]  # (bk, bq*G)
    recent = k_pos[:, None] > q_pos[None, :] - window if window is not None else True
    key_axis = 1
  else:
    mask = (q_seg[:, :, None] == k_seg[:, None, :]) & (q_seg[:, :, None] != 0)
    allowed = k_pos[None, :] <= q_pos[:, None]  # (bq*G, bk)
    recent = k_pos[None, :] > q_pos[:, None] - window if window is not None else True
    key_axis = 2
  if causal:
    if prefix_len is not None:
      in_prefix = k_pos[None] < prefix_len[:, None]  # (B, bk)
      in_prefix = jnp.expand_dims(in_prefix, 3 - key_axis)  # broadcast over the query rows
      allowed = allowed | in_prefix
    mask = mask & (allowed & recent)  # the window bounds the prefix's keys too
  return mask[:, None]


def _visit_kind(mask: Array) -> Array:
  """0: no query sees any key (skip the block); 1: some do (mask it); 2: all do."""
  return mask.any().astype(jnp.int32) + mask.all().astype(jnp.int32)


def _key_blocks(i: int, block_q: int, block_k: int, num_k: int, causal: bool,
                prefix_len: Array | None) -> Array | int:
  """How many key blocks query block i can see at most (the causal loop bound)."""
  if not causal:
    return num_k
  hi = min(num_k, ((i + 1) * block_q - 1) // block_k + 1)
  if prefix_len is None:
    return hi
  prefix_blocks = (jnp.max(prefix_len) + block_k - 1) // block_k
  return jnp.clip(prefix_blocks, hi, num_k)


def _first_query_block(j: int, block_q: int, block_k: int, causal: bool,
                       prefix_len: Array | None) -> int:
  """The first query block that can see key block j (0 unless causal without prefix)."""
  return (j * block_k) // block_q if causal and prefix_len is None else 0


def _first_key_block(i: int, block_q: int, block_k: int, window: Array | None) -> Array | int:
  """The first key block that query block i's first query sees within the window."""
  return 0 if window is None else jnp.maximum(0, (i * block_q - window + 1) // block_k)


def _query_blocks(j: int, block_q: int, block_k: int, num_q: int,
                  window: Array | None) -> Array | int:
  """How many query blocks can see key block j at most: its last key is in the window of
  the queries up to window - 1 positions later."""
  if window is None:
    return num_q
  return jnp.minimum(num_q, ((j + 1) * block_k + window - 2) // block_q + 1)


def _capped(scores: Array, softcap: float) -> tuple[Array, Array | None]:
  """Soft-capped scores c tanh(s / c) (Gemma 2) and the tanh, whose derivative the backward
  pass needs; the scores themselves when softcap is 0."""
  if not softcap:
    return scores, None
  t = jnp.tanh(scores / softcap)
  return softcap * t, t


def _forward(q, k, v, seg, prefix_len, window, spec):
  """q (B, K, T*G, D), k/v (B, K, T, D) -> out (B, K, T*G, D), lse (B, K, T*G)."""
  causal, groups, block_q, block_k, scale, softcap = spec
  rows = block_q * groups
  num_q, num_k = k.shape[2] // block_q, k.shape[2] // block_k
  scale = q.shape[-1] ** -0.5 if scale is None else scale
  outs, lses = [], []
  for i in range(num_q):
    q_blk = q[:, :, i * rows:(i + 1) * rows] * scale  # (B, K, bq*G, D)
    q_seg = seg[:, i * block_q:(i + 1) * block_q]

    def visit(j, carry, q_blk=q_blk, q_seg=q_seg, i=i):
      k_blk, v_blk, k_seg = (jax.lax.dynamic_slice_in_dim(x, j * block_k, block_k, axis=a)
                             for x, a in ((k, 2), (v, 2), (seg, 1)))
      mask = _block_mask(q_seg, k_seg, i * block_q, j * block_k, groups, causal, prefix_len,
                         window)

      def update(carry, masked):
        m, l, acc = carry
        scores = jnp.einsum("bkqd,bksd->bkqs", q_blk, k_blk, preferred_element_type=jnp.float32)
        scores = _capped(scores, softcap)[0]
        if masked:
          scores = jnp.where(mask, scores, _NEG)  # (B, K, bq*G, bk)
        m_new = jnp.maximum(m, scores.max(-1))
        p = jnp.exp(scores - m_new[..., None])
        correction = jnp.exp(m - m_new)
        pv = jnp.einsum("bkqs,bksd->bkqd", p.astype(v.dtype), v_blk,
                        preferred_element_type=jnp.float32)
        return m_new, l * correction + p.sum(-1), acc * correction[..., None] + pv

      branches = (lambda c: c, functools.partial(update, masked=True),
                  functools.partial(update, masked=False))
      return jax.lax.switch(_visit_kind(mask), branches, carry)

    shape = q_blk.shape[:-1]
    init = (jnp.full(shape, _NEG, jnp.float32), jnp.zeros(shape, jnp.float32),
            jnp.zeros(q_blk.shape, jnp.float32))
    lo = _first_key_block(i, block_q, block_k, window)
    hi = _key_blocks(i, block_q, block_k, num_k, causal, prefix_len)
    m, l, acc = jax.lax.fori_loop(lo, hi, visit, init)
    seen = l > 0  # rows that see no key at all (padding) give 0, not NaN
    safe_l = jnp.where(seen, l, 1.0)
    outs.append(jnp.where(seen[..., None], acc / safe_l[..., None], 0.0))
    lses.append(jnp.where(seen, m + jnp.log(safe_l), jnp.inf))
  return jnp.concatenate(outs, axis=2).astype(q.dtype), jnp.concatenate(lses, axis=2)


def _backward(q, k, v, seg, prefix_len, window, out, lse, d_out, spec):
  """FlashAttention-2's backward: per key block, walk the query blocks that see it."""
  causal, groups, block_q, block_k, scale, softcap = spec
  rows = block_q * groups
  num_q, num_k = k.shape[2] // block_q, k.shape[2] // block_k
  scale = q.shape[-1] ** -0.5 if scale is None else scale
  delta = jnp.sum(d_out.astype(jnp.float32) * out.astype(jnp.float32), axis=-1)  # (B, K, T*G)
  dq = jnp.zeros(q.shape, jnp.float32)
  dks, dvs = [], []
  for j in range(num_k):
    k_blk, v_blk = k[:, :, j * block_k:(j + 1) * block_k], v[:, :, j * block_k:(j + 1) * block_k]
    k_seg = seg[:, j * block_k:(j + 1) * block_k]

    def visit(i, carry, k_blk=k_blk, v_blk=v_blk, k_seg=k_seg, j=j):
      rows_of = lambda x: jax.lax.dynamic_slice_in_dim(x, i * rows, rows, axis=2)
      q_blk, do_blk, lse_blk, delta_blk = rows_of(q), rows_of(d_out), rows_of(lse), rows_of(delta)
      q_seg = jax.lax.dynamic_slice_in_dim(seg, i * block_q, block_q, axis=1)
      mask = _block_mask(q_seg, k_seg, i * block_q, j * block_k, groups, causal, prefix_len,
                         window, keys_first=True)

      def update(carry, masked):
        dq, dk, dv = carry
        scores_t = jnp.einsum("bksd,bkqd->bksq", k_blk, q_blk * scale,
                              preferred_element_type=jnp.float32)  # (B, K, bk, bq*G)
        scores_t, tanh_t = _capped(scores_t, softcap)
        p_t = jnp.exp(scores_t - lse_blk[:, :, None])
        if masked:
          p_t = jnp.where(mask, p_t, 0.0)
        dv = dv + jnp.einsum("bksq,bkqd->bksd", p_t.astype(do_blk.dtype), do_blk,
                             preferred_element_type=jnp.float32)
        dp_t = jnp.einsum("bksd,bkqd->bksq", v_blk, do_blk, preferred_element_type=jnp.float32)
        ds_t = p_t * (dp_t - delta_blk[:, :, None])
        if softcap:  # d/ds of c tanh(s / c)
          ds_t = ds_t * (1 - tanh_t * tanh_t)
        ds_t = (ds_t * scale).astype(q.dtype)
        dk = dk + jnp.einsum("bksq,bkqd->bksd", ds_t, q_blk, preferred_element_type=jnp.float32)
        dq_blk = jnp.einsum("bksq,bksd->bkqd", ds_t, k_blk, preferred_element_type=jnp.float32)
        return jax.lax.dynamic_update_slice_in_dim(dq, rows_of(dq) + dq_blk, i * rows, 2), dk, dv

      branches = (lambda c: c, functools.partial(update, masked=True),
                  functools.partial(update, masked=False))
      return jax.lax.switch(_visit_kind(mask), branches, carry)

    zeros = jnp.zeros(k_blk.shape, jnp.float32)
    lo = _first_query_block(j, block_q, block_k, causal, prefix_len)
    hi = _query_blocks(j, block_q, block_k, num_q, window)
    dq, dk, dv = jax.lax.fori_loop(lo, hi, visit, (dq, zeros, zeros))
    dks.append(dk)
    dvs.append(dv)
  return (dq.astype(q.dtype), jnp.concatenate(dks, axis=2).astype(k.dtype),
          jnp.concatenate(dvs, axis=2).astype(v.dtype))


def _no_grad(x: Array | None):
  return None if x is None else jnp.zeros(x.shape, jax.dtypes.float0)


@functools.partial(jax.custom_vjp, nondiff_argnums=(6,))
def _attention(q, k, v, seg, prefix_len, window, spec):
  """spec: (causal, groups, block_q, block_k, scale (None: 1/sqrt(D)), softcap (0: off))."""
  return _forward(q, k, v, seg, prefix_len, window, spec)[0]


def _attention_fwd(q, k, v, seg, prefix_len, window, spec):
  out, lse = _forward(q, k, v, seg, prefix_len, window, spec)
  return out, (q, k, v, seg, prefix_len, window, out, lse)


def _attention_bwd(spec, res, d_out):
  q, k, v, seg, prefix_len, window, out, lse = res
  dq, dk, dv = _backward(q, k, v, seg, prefix_len, window, out, lse, d_out, spec)
  return dq, dk, dv, _no_grad(seg), _no_grad(prefix_len), _no_grad(window)


_attention.defvjp(_attention_fwd, _attention_bwd)


# Up to this length one block covers the sequence, and keeping its probabilities for the
# backward pass (B * H * T^2 floats, no more than 2*H*T/D activations' worth) beats
# recomputing them: clm_tiny's attention (T 128) 19.5 -> 13.9 ms, T 256 62.6 -> 45.9 ms
# forward and backward on CPU; at T 512 it no longer paid (112.8 vs 108.5 ms).
SAVED_PROBS_MAX_LEN = 256


def _short_scores(q, k, spec) -> tuple[Array, Array | None]:
  """Soft-capped scores (B, K, T*G, T) of one whole-sequence block, and their tanh."""
  operands, scale, softcap = spec[2:]
  scale = q.shape[-1] ** -0.5 if scale is None else scale
  scores = jnp.einsum("bkqd,bksd->bkqs", (q * scale).astype(operands),
                      k.astype(operands), preferred_element_type=jnp.float32)
  return _capped(scores, softcap)


def _probs(q, k, seg, prefix_len, window, spec):
  """Normalised probabilities (B, K, T*G, T) of one whole-sequence block, 0 where masked."""
  causal, groups = spec[:2]
  mask = _block_mask(seg, seg, 0, 0, groups, causal, prefix_len, window)  # (B, 1, T*G, T)
  scores = jnp.where(mask, _short_scores(q, k, spec)[0], _NEG)
  e = jnp.where(mask, jnp.exp(scores - scores.max(-1, keepdims=True)), 0.0)
  total = e.sum(-1, keepdims=True)
  return e / jnp.where(total > 0, total, 1.0)  # rows that see no key (padding): 0


@functools.partial(jax.custom_vjp, nondiff_argnums=(6,))
def _short_attention(q, k, v, seg, prefix_len, window, spec):
  """spec: (causal, groups, operands, scale, softcap); operands: the dtype of the matmuls'
  operands (sums float32).
  The two matmuls that contract over the query rows (dv, dk) take float32 operands:
  XLA's CPU backend runs that layout through Eigen, slower in bfloat16."""
  return _short_fwd(q, k, v, seg, prefix_len, window, spec)[0]


def _short_fwd(q, k, v, seg, prefix_len, window, spec):
  operands = spec[2]
  p = _probs(q, k, seg, prefix_len, window, spec).astype(operands)
  out = jnp.einsum("bkqs,bksd->bkqd", p, v.astype(operands),
                   preferred_element_type=jnp.float32).astype(q.dtype)
  return out, (q, k, v, seg, prefix_len, window, out, p)


def _short_bwd(spec, res, d_out):
  q, k, v, seg, prefix_len, window, out, p = res
  operands, wide = spec[2], jnp.promote_types(spec[2], q.dtype)  # wide: float32 for mixed
  f32 = dict(preferred_element_type=jnp.float32)
  delta = jnp.sum(d_out.astype(jnp.float32) * out.astype(jnp.float32), -1, keepdims=True)
  dv = jnp.einsum("bkqs,bkqd->bksd", p.astype(wide), d_out.astype(wide), **f32)
  dp = jnp.einsum("bkqd,bksd->bkqs", d_out.astype(operands), v.astype(operands), **f32)
  ds = p.astype(jnp.float32) * (dp - delta)
  if spec[4]:  # soft-capped: d/ds of c tanh(s / c), from the scores recomputed
    tanh = _short_scores(q, k, spec)[1]
    ds = ds * (1 - tanh * tanh)
  # The scale goes on the (T, D) operands: XLA's CPU matmul fusions would build a (T, T)
  # array of it.
  scale = q.shape[-1] ** -0.5 if spec[3] is None else spec[3]
  dq = jnp.einsum("bkqs,bksd->bkqd", ds.astype(operands), (k * scale).astype(operands), **f32)
  dk = jnp.einsum("bkqs,bkqd->bksd", ds.astype(wide), (q * scale).astype(wide), **f32)
  return (dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), _no_grad(seg),
          _no_grad(prefix_len), _no_grad(window))


_short_attention.defvjp(_short_fwd, _short_bwd)


def _pad_to(x: Array, multiple: int) -> Array:
  """Pads axis 1 to a multiple; padded positions get segment id 0 and are masked out."""
  pad = -x.shape[1] % multiple
  return jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2)) if pad else x


def blockwise_attention(q: Array, k: Array, v: Array, segment_ids: Array, causal: bool,
                        prefix_len: Array | None = None, block_q: int = 512,
                        block_k: int = 512, matmul_dtype: jnp.dtype | None = None,
                        window: int | Array | None = None, scale: float | None = None,
                        softcap: float = 0.0) -> Array:
  """Exact masked attention, blockwise. q (B, T, H, Dh); k, v (B, T, K, Dh), H a
  multiple of K; segment_ids (B, T) (0 = padding); prefix_len (B,) -> (B, T, H, Dh).

  Rows that may attend to nothing (padding) come out as zeros. `matmul_dtype`: the
  operands of the one-block path's matmuls (bfloat16_matmuls); longer rows ignore it.
  `window` (causal only; an int or a traced scalar): a query sees the `window` keys ending
  at itself. `scale`: of the scores (default 1/sqrt(Dh)); `softcap`: c tanh(scores / c).
  """
  b, t, h, d = q.shape
  kv_heads = k.shape[2]
  groups = h // kv_heads
  short = t <= min(SAVED_PROBS_MAX_LEN, block_q, block_k)
  block_q, block_k = min(block_q, t), min(block_k, t)
  multiple = 1 if short else math.lcm(block_q, block_k)
  seg = _pad_to(segment_ids, multiple)
  q = _pad_to(q, multiple).reshape(b, -1, kv_heads, groups, d)
  q = q.transpose(0, 2, 1, 3, 4).reshape(b, kv_heads, -1, d)  # (B, K, T*G, Dh), row = t*G + g
  k = _pad_to(k, multiple).transpose(0, 2, 1, 3)  # (B, K, T, Dh)
  v = _pad_to(v, multiple).transpose(0, 2, 1, 3)
  window = None if window is None or not causal else jnp.asarray(window, jnp.int32)
  softcap = float(softcap)
  if short:
    operands = jnp.dtype(matmul_dtype or q.dtype).name
    out = _short_attention(q, k, v, seg, prefix_len, window,
                           (causal, groups, operands, scale, softcap))
  else:
    out = _attention(q, k, v, seg, prefix_len, window,
                     (causal, groups, block_q, block_k, scale, softcap))
  out = out.reshape(b, kv_heads, -1, groups, d).transpose(0, 2, 1, 3, 4).reshape(b, -1, h, d)
  return out[:, :t]
