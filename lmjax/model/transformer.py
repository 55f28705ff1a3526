"""The Transformer block and stack shared by encoders and decoders.

`scan_layers` and `remat_policy` are owned by `LayerStack` alone: the scanned
stack keeps one set of layer parameters with a leading `layers` axis, the
unrolled stack keeps `layers_0 .. layers_{L-1}`; `stack_layers` and
`unstack_layers` convert between the two layouts. Layers that differ (local and
global attention, Gemma 2, 3) differ by a flag: a Python bool in an unrolled stack,
one element of a scanned (L,) array in a scanned one. Sparse (mixture-of-experts) layers
return their router statistics, which the stack sows, stacked, into the "moe" collection.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from lmjax.model.attention import (DENSE_IMPLEMENTATIONS, MultiHeadAttention,
                                   resolve_implementation)
from lmjax.model.config import TransformerConfig
from lmjax.model.layers import Embeddings, Mlp, Norm
from lmjax.model.masks import CacheMask, DenseMasks, MaskSpec
from lmjax.model.moe import COLLECTION, MoeMlp, RouterStats

Array = jax.Array
_policies = jax.checkpoint_policies
REMAT_POLICIES = {
    "full": _policies.nothing_saveable,  # recompute everything: least memory
    "dots": _policies.checkpoint_dots,  # keep matmul outputs
    "dots_no_batch": _policies.dots_with_no_batch_dims_saveable,  # keep weight matmuls
    "save_attention_out": _policies.save_only_these_names("attention_out"),
}


class Block(nn.Module):
  """Attention + MLP with residuals; the norms where `norm_position` puts them.

  `local`: whether this layer attends within the sliding window; None: the layer reads
  it from its call (a scanned stack whose layers mix both kinds). `sparse`: its MLP is
  routed (`MoeMlp`, which sees which tokens are real, `valid`), and the block returns the
  router's statistics beside its output.
  """

  cfg: TransformerConfig
  deterministic: bool = True
  decode: bool = False
  local: bool | None = False
  sparse: bool = False

  @nn.compact
  def __call__(self, x: Array, mask, positions: Array, valid: Array,
               local: Array | None = None) -> tuple[Array, RouterStats | None]:
    cfg, det = self.cfg, self.deterministic
    local = self.local if self.local is not None else local
    attention = MultiHeadAttention(cfg, det, self.decode, name="attention")
    attn = lambda h: attention(h, mask, positions, local)
    stats = []  # the sparse MLP's router statistics
    if self.sparse:
      moe = MoeMlp(cfg, det, self.decode, name="mlp")

      def mlp(h):
        y, layer_stats = moe(h, valid)
        stats.append(layer_stats)
        return y
    else:
      mlp = Mlp(cfg, det, name="mlp")
    norm = lambda name: Norm(cfg, name=name)
    if cfg.norm_position == "pre":
      x = x + attn(norm("attention_norm")(x))  # (B, T, D)
      x = x + mlp(norm("mlp_norm")(x))
    elif cfg.norm_position == "post":
      x = norm("attention_norm")(x + attn(x))
      x = norm("mlp_norm")(x + mlp(x))
    elif cfg.norm_position == "sandwich":
      x = x + norm("attention_post_norm")(attn(norm("attention_norm")(x)))
      x = x + norm("mlp_post_norm")(mlp(norm("mlp_norm")(x)))
    else:  # branch_post
      x = x + norm("attention_post_norm")(attn(x))
      x = x + norm("mlp_post_norm")(mlp(x))
    x = nn.with_logical_constraint(x, ("batch", "length", "embed"))
    return x, (stats[0] if stats else None)  # (carry, per-layer output) as nn.scan expects


class LayerStack(nn.Module):
  """num_layers Blocks, scanned or unrolled, optionally rematerialised."""

  cfg: TransformerConfig
  deterministic: bool = True
  decode: bool = False

  @nn.compact
  def __call__(self, x: Array, mask, positions: Array, valid: Array) -> Array:
    """`valid` (B, T): which tokens are real (the routed MLPs' business)."""
    cfg = self.cfg
    block = Block
    if cfg.remat_policy != "none":
      block = nn.remat(block, policy=REMAT_POLICIES[cfg.remat_policy],
                       prevent_cse=not cfg.scan_layers)
    sparse = cfg.sparse_layers
    if cfg.scan_layers:  # every layer sparse, or none (config.py checks)
      uniform = cfg.uniform_layers  # None: the layers' kinds go in as data
      flags = () if uniform is not None else (jnp.asarray(cfg.local_layers),)
      scanned = nn.scan(block, variable_axes={"params": 0, "cache": 0},
                        split_rngs={"params": True, "dropout": True},
                        in_axes=(nn.broadcast,) * 3 + (0,) * len(flags),
                        length=cfg.num_layers, metadata_params={nn.PARTITION_NAME: "layers"})
      x, stats = scanned(cfg, self.deterministic, self.decode, uniform, sparse[0],
                         name="layers")(x, mask, positions, valid, *flags)
    else:
      per_layer = []
      for i, (local, is_sparse) in enumerate(zip(cfg.local_layers, sparse)):
        x, layer_stats = block(cfg, self.deterministic, self.decode, local, is_sparse,
                               name=f"layers_{i}")(x, mask, positions, valid)
        per_layer += [layer_stats] if is_sparse else []
      stats = jax.tree.map(lambda *xs: jnp.stack(xs), *per_layer) if per_layer else None
    if stats is not None:  # (sparse layers, ...) each
      self.sow(COLLECTION, "router_stats", stats)
    return x


class Transformer(nn.Module):
  """Embeddings, the layer stack and (pre-norm) a final norm: ids -> hidden states.

  `decode` (decoders only) keeps a key/value cache in the "cache" collection:
  the first call, with the full cache length, creates it; later calls append.
  """

  cfg: TransformerConfig
  deterministic: bool = True
  decode: bool = False

  def setup(self):
    self.embed = Embeddings(self.cfg, self.deterministic)
    self.stack = LayerStack(self.cfg, self.deterministic, self.decode)
    if self.decode:
      local = self.cfg.local_layers
      self.cache_mask = CacheMask(self.cfg.sliding_window if any(local) else 0,
                                  mixed=len(set(local)) > 1)
    if self.cfg.norm_position != "post":
      self.final_norm = Norm(self.cfg)

  def __call__(self, tokens: Array, segment_ids: Array | None = None,
               positions: Array | None = None, token_types: Array | None = None,
               prefix_len: Array | None = None) -> Array:
    """tokens, segment_ids, positions, token_types: (B, T); prefix_len: (B,) -> (B, T, D)."""
    if segment_ids is None:
      segment_ids = jnp.ones_like(tokens)
    if positions is None:
      positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
    if self.decode:
      mask = self.cache_mask(segment_ids)  # (B, 1, T, cache length), or both kinds
    else:
      mask = self._mask(MaskSpec(segment_ids, prefix_len, self.cfg.causal))
    x = self.embed(tokens, positions, token_types)  # (B, T, D)
    x = self.stack(x, mask, positions, segment_ids != 0)
    if self.cfg.norm_position != "post":
      x = self.final_norm(x)
    return x

  def _mask(self, spec: MaskSpec) -> MaskSpec | Array | DenseMasks:
    """The spec, or for a dense implementation its (B, 1, T, T) mask(s), built once here
    rather than once per layer: with the window where every layer is local, both kinds
    where they mix."""
    cfg = self.cfg
    impl = resolve_implementation(cfg.attention_impl, cfg.compute_dtype,
                                  spec.prefix_len is not None, bool(cfg.attn_softcap))
    if impl not in DENSE_IMPLEMENTATIONS:
      return spec
    uniform = cfg.uniform_layers
    if uniform is None:
      return DenseMasks(spec.dense(), spec.dense(cfg.sliding_window))
    return spec.dense(cfg.sliding_window if uniform else None)

  def embedding_table(self) -> Array:
    """The token embedding (V, D), which a tied head projects onto."""
    return self.embed.tokens.embedding


def stack_layers(params: dict[str, Any], num_layers: int) -> dict[str, Any]:
  """Unrolled parameters (layers_0..) -> scanned layout (layers, leading axis L)."""
  def convert(tree):
    if not isinstance(tree, dict):
      return tree
    if "layers_0" in tree:
      rest = {k: v for k, v in tree.items() if not k.startswith("layers_")}
      layers = [tree[f"layers_{i}"] for i in range(num_layers)]
      return {**rest, "layers": jax.tree.map(lambda *xs: jnp.stack(xs), *layers)}
    return {k: convert(v) for k, v in tree.items()}
  return convert(params)


def unstack_layers(params: dict[str, Any], num_layers: int) -> dict[str, Any]:
  """Scanned parameters -> unrolled layout; the inverse of `stack_layers`."""
  def convert(tree):
    if not isinstance(tree, dict):
      return tree
    if "layers" in tree:
      rest = {k: v for k, v in tree.items() if k != "layers"}
      per_layer = {f"layers_{i}": jax.tree.map(lambda x, i=i: x[i], tree["layers"])
                   for i in range(num_layers)}
      return {**rest, **per_layer}
    return {k: convert(v) for k, v in tree.items()}
  return convert(params)
