"""How tokens reach their experts, and come back weighted.

`dropless`: each device sorts its tokens' (token, expert) assignments by expert and runs
the experts as grouped matmuls over the sorted rows (`jax.lax.ragged_dot`, which XLA:TPU
compiles to a tiled grouped-matmul kernel like megablox's; on CPU, where XLA computes every
group on every row, a batched matmul over per-expert tiles of rows), under `shard_map`. With experts sharded over the `expert` mesh axis
and tokens split over it too (the default rules: the batch is sharded over data, fsdp and
expert), rows travel to the device that holds their expert and back by two all-to-alls of
fixed-size buffers; with tokens replicated over it, each device runs its own experts and
the partial outputs are summed. Expert widths split over `tensor` are summed at the end.
Rows move by gathers whose gradients are gathers too (`take_rows`): no scatter anywhere,
which XLA:TPU compiles slowly.

`capacity`: GShard's one-hot dispatch. Each row of the batch is a group; an expert takes at
most ceil(capacity_factor * T * k / E) of a row's assignments, first choices before second
ones; the rest are dropped (the token keeps its residual) and counted. Dispatch and combine
are einsums, and a sharding constraint puts the dispatched (B, E, C, D) tokens' expert
axis on the `expert` mesh axis, which XLA turns into all-to-all. docs/moe.md compares them.
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from lmjax.model.config import TransformerConfig
from lmjax.model.layers import ACTIVATIONS

Array = jax.Array
Kernels = dict[str, Array]  # gate, up or wi: (E, D, F); wo: (E, F, D)


def _platform() -> str:
  mesh = jax.sharding.get_abstract_mesh()  # compiling for a TPU topology: TPU's choice
  return mesh.abstract_device.platform if not mesh.empty else jax.default_backend()


def grouped_matmul(a: Array, w: Array, sizes: Array, impl: str) -> Array:
  """(M, K) rows sorted by group, (G, K, N) weights, (G,) rows per group -> (M, N) float32;
  rows past the groups' total give zeros. `impl`: `model.moe.grouped_matmul`."""
  if impl == "auto":
    impl = "tiled" if _platform() == "cpu" else "ragged_dot"
  a, w = jnp.asarray(a), jnp.asarray(w)  # imported weights may be numpy: indexed by tracers
  if impl == "ragged_dot":
    return jax.lax.ragged_dot(a, w, sizes, preferred_element_type=jnp.float32)
  return _tiled(a, w, sizes)


def _tiled(a: Array, w: Array, sizes: Array) -> Array:
  """The grouped matmul as one batched matmul over tiles of rows: each group's rows start
  a new tile (at most G tiles of padding), each tile multiplies its group's weights. On CPU
  this does ~1.1x the useful work, where ragged_dot does G times it."""
  m, g = a.shape[0], w.shape[0]
  tile = max(8, min(128, 2 ** int(math.log2(max(m // (4 * g), 1)))))
  tiles = -(-m // tile) + g
  padded = (sizes + tile - 1) // tile * tile
  first = jnp.cumsum(padded) - padded  # each group's first padded row
  ends = jnp.cumsum(sizes)
  r = jnp.arange(m)
  group = jnp.searchsorted(ends, r, side="right")  # (M,); G past the last group
  row = jnp.where(group < g, first[jnp.minimum(group, g - 1)] + r - (ends - sizes)[
      jnp.minimum(group, g - 1)], tiles * tile)  # each row's padded place
  source = jnp.full((tiles * tile,), m, jnp.int32).at[row].set(r.astype(jnp.int32),
                                                                mode="drop")
  xs = jnp.concatenate([a, jnp.zeros((1, a.shape[1]), a.dtype)])[source]  # (P, K)
  owner = jnp.searchsorted(jnp.cumsum(padded), jnp.arange(tiles) * tile, side="right")
  ys = jnp.einsum("tmk,tkn->tmn", xs.reshape(tiles, tile, -1), w[jnp.minimum(owner, g - 1)],
                  preferred_element_type=jnp.float32).reshape(tiles * tile, -1)
  return jnp.where((group < g)[:, None], ys[jnp.minimum(row, tiles * tile - 1)], 0)


def expert_mlp(rows: Array, kernels: Kernels, sizes: Array, cfg: TransformerConfig) -> Array:
  """The experts' MLPs on rows sorted by expert ((M, D); `sizes[e]` rows each): (M, D).
  Operands in the matmul dtype, sums in float32, as the dense layers compute."""
  md, cd, impl = cfg.matmul_dtype, cfg.compute_dtype, cfg.moe.grouped_matmul
  mm = lambda h, w: grouped_matmul(h.astype(md), w.astype(md), sizes, impl).astype(cd)
  act = ACTIVATIONS[cfg.activation]
  if cfg.mlp == "swiglu":
    h = act(mm(rows, kernels["gate"])) * mm(rows, kernels["up"])  # (M, F)
  else:
    h = act(mm(rows, kernels["wi"]))
  return mm(h, kernels["wo"])  # (M, D)


def _inverse(order: Array) -> Array:
  """The inverse of a permutation (a sort: XLA:TPU sorts a scatter's indices anyway)."""
  return jnp.argsort(order)


def _counts(key: Array, length: int) -> Array:
  """`jnp.bincount(key, length=length)` as a compare and sum: no scatter."""
  return jnp.sum(key[:, None] == jnp.arange(length, dtype=key.dtype), axis=0, dtype=jnp.int32)


@jax.custom_vjp
def take_rows(x: Array, index: Array, back: Array, back_valid: Array) -> Array:
  """`x[index]`: rows of x (N, D) at `index` (any shape), whose gradient is a gather too.

  Autodiff transposes a gather into a scatter-add, which XLA:TPU sorts and emits row by
  row: slow to compile (minutes for moe_1b's layer) and to run. Here every place a row is
  moved to is known: `back` (N, m) lists, for each row of x, the flat positions of the
  result that hold it (`back_valid` marks the real ones), so the gradient of row i is the
  sum over them: a gather.
  """
  return x[index]


def _take_rows_fwd(x, index, back, back_valid):
  return x[index], (back, back_valid)


def _take_rows_bwd(res, g):
  back, back_valid = res
  flat = g.reshape(-1, g.shape[-1])
  picked = jnp.where(back_valid[..., None], flat[back], 0)  # (N, m, D)
  return jnp.sum(picked, axis=1, dtype=g.dtype), None, None, None


take_rows.defvjp(_take_rows_fwd, _take_rows_bwd)


def _permute(x: Array, order: Array, inverse: Array) -> Array:
  """x[order] for a permutation `order` with inverse `inverse`; its gradient gathers back."""
  return take_rows(x, order, inverse[:, None], jnp.ones((order.size, 1), bool))


def _spread(x: Array, order: Array, inverse: Array, k: int) -> Array:
  """Tokens x (n, D) at the n k assignments sorted by `order` (assignment j of token i at
  i k + j before sorting): x[order // k], (n k, D)."""
  n = x.shape[0]
  return take_rows(x, order // k, inverse.reshape(n, k), jnp.ones((n, k), bool))


def _combine(y: Array, weights: Array, keep: Array) -> Array:
  """(n, k, D) expert outputs weighted by their (n, k) router weights, summed: (n, D)."""
  return jnp.einsum("nkd,nk->nd", y, (weights * keep).astype(y.dtype))


def _local_experts(x: Array, experts: Array, weights: Array, valid: Array, kernels: Kernels,
                   first: Array | int, cfg: TransformerConfig) -> Array:
  """Tokens x (n, D) through the experts held here (`first` .. `first` + their number):
  (n, D), zero for tokens routed elsewhere."""
  n, k = experts.shape
  held = next(iter(kernels.values())).shape[0]
  local = experts - first
  mine = valid[:, None] & (local >= 0) & (local < held)  # (n, k)
  key = jnp.where(mine, local, held).reshape(-1)  # others sort last, past every group
  order = jnp.argsort(key, stable=True)
  inverse = _inverse(order)
  sizes = _counts(key, held + 1)[:held]
  out = expert_mlp(_spread(x, order, inverse, k), kernels, sizes, cfg)  # (n k, D)
  out = jnp.where((key[order] < held)[:, None], out, 0)
  return _combine(_permute(out, inverse, order).reshape(n, k, -1), weights, mine)


def _exchange(x: Array, experts: Array, weights: Array, valid: Array, kernels: Kernels,
              axis: str, ep: int, cfg: TransformerConfig) -> Array:
  """Tokens x (n, D) of this device through experts anywhere on the `axis` ring of `ep`
  devices: assignments sorted by expert go to the device holding it in fixed-size blocks
  (a device may send all n*k of its rows to one peer: dropless), are computed there, and
  come back by a second all-to-all. (n, D)."""
  n, k = experts.shape
  a, num, held = n * k, cfg.moe.num_experts, cfg.moe.num_experts // ep
  key = jnp.where(valid[:, None], experts, num).reshape(-1)  # padding: past every expert
  order = jnp.argsort(key, stable=True)
  inverse = _inverse(order)
  skey, rows = key[order], _spread(x, order, inverse, k)  # (a,), (a, D) sorted by expert
  counts = _counts(key, num + 1)[:num].reshape(ep, held)
  per_peer = counts.sum(axis=1)  # (ep,) rows for each peer's experts
  start = jnp.cumsum(per_peer) - per_peer
  r = jnp.arange(a)
  send = _to_blocks(rows, skey < num, jnp.minimum(skey // held, ep - 1), start, per_peer)
  recv = jax.lax.all_to_all(send, axis, 0, 0, tiled=True)  # block i: from peer i
  recv_counts = jax.lax.all_to_all(counts, axis, 0, 0, tiled=True)  # (ep, held)
  bounds = jnp.cumsum(recv_counts, axis=1)
  lkey = jax.vmap(lambda b: jnp.searchsorted(b, r, side="right"))(bounds).reshape(-1)
  order2 = jnp.argsort(lkey, stable=True)  # received rows by local expert; empty rows last
  inverse2 = _inverse(order2)
  out = expert_mlp(_permute(recv.reshape(ep * a, -1), order2, inverse2), kernels,
                   recv_counts.sum(axis=0), cfg)
  out = jnp.where((lkey[order2] < held)[:, None], out, 0)
  back = jax.lax.all_to_all(_permute(out, inverse2, order2).reshape(ep, a, -1), axis, 0, 0,
                            tiled=True)
  got = _from_blocks(back, jnp.minimum(skey // held, ep - 1), start, per_peer)
  got = jnp.where((skey < num)[:, None], got, 0)
  return _combine(_permute(got, inverse, order).reshape(n, k, -1), weights, valid[:, None])


def _to_blocks(rows: Array, real: Array, peer: Array, start: Array, per_peer: Array
               ) -> Array:
  """Sorted rows (a, D), peer p's `per_peer[p]` of them from `start[p]` on, as one block of
  a rows per peer, zero past its rows: (ep, a, D). Row i goes to block peer[i] at
  i - start[peer[i]] (`real` rows only), which makes the gradient a gather."""
  a = rows.shape[0]
  r = jnp.arange(a)
  back = jnp.where(real, peer * a + r - start[peer], 0)[:, None]
  blocks = take_rows(rows, jnp.minimum(start[:, None] + r, a - 1), back, real[:, None])
  return jnp.where((r < per_peer[:, None])[..., None], blocks, 0)


def _from_blocks(blocks: Array, peer: Array, start: Array, per_peer: Array) -> Array:
  """The inverse of `_to_blocks`: (ep, a, D) -> the a sorted rows (a, D); rows of no peer
  (padding, `peer` clipped) get some block's row, for the caller to mask."""
  ep, a, d = blocks.shape
  r = jnp.arange(a)
  index = peer * a + jnp.clip(r - start[peer], 0, a - 1)
  back = jnp.minimum(start[:, None] + r, a - 1).reshape(-1, 1)
  return take_rows(blocks.reshape(ep * a, d), index, back,
                   (r < per_peer[:, None]).reshape(-1, 1))


def _dividing(mesh: Any, axes: Any, size: int) -> Any:
  """`axes` if they split `size` evenly, else None (replicated: e.g. init's batch of 1)."""
  names = axes if isinstance(axes, tuple) else (axes,)
  total = math.prod(mesh.shape[a] for a in names if a is not None)
  return axes if size % total == 0 else None


def _names(axes: Any) -> tuple[str, ...]:
  return tuple(a for a in (axes if isinstance(axes, tuple) else (axes,)) if a is not None)


def dropless(x: Array, experts: Array, weights: Array, valid: Array, kernels: Kernels,
             cfg: TransformerConfig) -> Array:
  """x (B, T, D), experts and weights (B, T, k), valid (B, T) -> (B, T, D): every
  assignment computed (see the module doc)."""
  b, t, d = x.shape
  flat = lambda z: z.reshape(z.shape[0] * z.shape[1], *z.shape[2:])  # (n, ...) tokens
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    out = _local_experts(flat(x), flat(experts), flat(weights), flat(valid), kernels, 0, cfg)
    return out.reshape(b, t, d)
  batch, length = nn.logical_to_mesh_axes(("batch", "length"))
  batch, length = _dividing(mesh, batch, b), _dividing(mesh, length, t)
  expert_axis = _dividing(mesh, nn.logical_to_mesh_axes(("expert",))[0], cfg.moe.num_experts)
  mlp_axis = _dividing(mesh, nn.logical_to_mesh_axes(("mlp",))[0], cfg.expert_d_ff)
  ep = math.prod(mesh.shape[a] for a in _names(expert_axis))
  expert_axis = expert_axis if ep > 1 else None  # an axis of 1: outputs vary over no axis
  exchange = ep > 1 and set(_names(expert_axis)) <= set(_names(batch) + _names(length))

  def local(x, experts, weights, valid, kernels):
    bl, tl = x.shape[:2]
    args = (flat(x), flat(experts), flat(weights), flat(valid), kernels)
    if exchange:
      out = _exchange(*args, expert_axis, ep, cfg)
    else:
      first = jax.lax.axis_index(expert_axis) * (cfg.moe.num_experts // ep) if ep > 1 else 0
      out = _local_experts(*args, first, cfg)
      out = jax.lax.psum(out, expert_axis) if ep > 1 else out
    out = jax.lax.psum(out, mlp_axis) if _names(mlp_axis) else out
    return out.reshape(bl, tl, d)

  rows, flags = PartitionSpec(batch, length, None), PartitionSpec(batch, length)
  w_in, w_out = PartitionSpec(expert_axis, None, mlp_axis), PartitionSpec(expert_axis, mlp_axis)
  specs = {name: w_out if name == "wo" else w_in for name in kernels}
  return jax.shard_map(local, mesh=mesh, in_specs=(rows, rows, rows, flags, specs),
                       out_specs=rows)(x, experts, weights, valid, kernels)


def capacity(x: Array, experts: Array, weights: Array, valid: Array, kernels: Kernels,
             cfg: TransformerConfig) -> tuple[Array, Array]:
  """x (B, T, D), experts and weights (B, T, k), valid (B, T) -> ((B, T, D), the number of
  assignments dropped over capacity): one-hot dispatch per row (see the module doc)."""
  m, cd, md = cfg.moe, cfg.compute_dtype, cfg.matmul_dtype
  b, t, _ = x.shape
  k, num = m.experts_per_token, m.num_experts
  cap = max(1, math.ceil(m.capacity_factor * t * k / num))
  chosen = jax.nn.one_hot(experts, num, dtype=jnp.int32) * valid[..., None, None]  # (B,T,k,E)
  ordered = chosen.transpose(0, 2, 1, 3).reshape(b, k * t, num)  # first choices first
  slot = jnp.cumsum(ordered, axis=1) - 1  # each assignment's place in its expert's buffer
  kept = ordered * (slot < cap)
  back = lambda z: z.reshape(b, k, t, num).transpose(0, 2, 1, 3)  # (B, T, k, E)
  slots = jax.nn.one_hot(back(slot), cap, dtype=cd) * back(kept)[..., None].astype(cd)
  dispatch = jnp.sum(slots, axis=2)  # (B, T, E, C): the top-k experts are distinct
  combine = jnp.einsum("btkec,btk->btec", slots, weights.astype(cd))
  mm = lambda spec, a, w: jnp.einsum(spec, a.astype(md), w.astype(md),
                                     preferred_element_type=jnp.float32).astype(cd)
  xe = _expert_sharded(mm("btd,btec->becd", x, dispatch))  # (B, E, C, D)
  act = ACTIVATIONS[cfg.activation]
  if cfg.mlp == "swiglu":
    h = act(mm("becd,edf->becf", xe, kernels["gate"])) * mm("becd,edf->becf", xe, kernels["up"])
  else:
    h = act(mm("becd,edf->becf", xe, kernels["wi"]))
  ye = _expert_sharded(mm("becf,efd->becd", h, kernels["wo"]))
  y = mm("becd,btec->btd", ye, combine)
  return y, jnp.sum(ordered - kept).astype(jnp.float32)


def _expert_sharded(z: Array) -> Array:
  """(B, E, C, D) with E on the `expert` mesh axis and B on the other batch axes."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return z
  expert = _dividing(mesh, nn.logical_to_mesh_axes(("expert",))[0], z.shape[1])
  batch = tuple(a for a in _names(nn.logical_to_mesh_axes(("batch",))[0])
                if a not in _names(expert))
  batch = _dividing(mesh, batch or None, z.shape[0])
  return jax.lax.with_sharding_constraint(z, PartitionSpec(batch, expert, None, None))
