"""Routed MLPs (mixture of experts): the router, top-k routing, the router's statistics
and auxiliary losses, and the layer that sends each token to its experts.

`MoeMlp` replaces a block's dense `Mlp` on the layers `model.moe` makes sparse. It
returns the layer's output and its router statistics (`RouterStats`: per expert, the
top-k assignments and summed router probabilities of real tokens; the summed squared
log-partition; dropped assignments). The layer stack sows them, stacked over sparse
layers, into the "moe" collection; `apply_with_router_stats` reads them back and the
objectives turn them into the load-balancing and z losses (`router_sums`). How tokens
reach their experts (sorted and grouped, exchanged between devices, or dispatched by
one-hot matmuls under a capacity) is `lmjax.model.moe_dispatch`. docs/moe.md says why.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from lmjax.model.config import TransformerConfig
from lmjax.model.layers import Mlp, normal_init
from lmjax.model import moe_dispatch

Array = jax.Array
RouterStats = dict[str, Array]  # count (E,), prob (E,), tokens, z, dropped; stacked: (L, ...)
COLLECTION = "moe"  # where the layer stack sows the statistics


def route(logits: Array, k: int, router: str, normalize: bool) -> tuple[Array, Array]:
  """(N, E) float32 router logits -> the k experts of each token and their weights,
  ((N, k) float32, (N, k) int32)."""
  if router == "softmax_topk":  # Mixtral, Qwen3-MoE, OLMoE
    weights, experts = _top_k(jax.nn.softmax(logits, axis=-1), k)
    if normalize:
      weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
  else:  # topk_softmax: the softmax over the k chosen logits
    top, experts = _top_k(logits, k)
    weights = jax.nn.softmax(top, axis=-1)
  return weights, experts


def _top_k(scores: Array, k: int) -> tuple[Array, Array]:
  """`jax.lax.top_k` whose values are picked by a one-hot product (exact): top_k's own
  gradient is a scatter, which XLA:TPU compiles slowly."""
  experts = jax.lax.top_k(jax.lax.stop_gradient(scores), k)[1]
  pick = jax.nn.one_hot(experts, scores.shape[-1], dtype=scores.dtype)  # (N, k, E)
  return jnp.einsum("ne,nke->nk", scores, pick, precision="highest"), experts


def router_stats(logits: Array, experts: Array, valid: Array) -> RouterStats:
  """Sums over real tokens (`valid`, (N,)) of what the auxiliary losses and the load
  measures need: top-k assignments and router probabilities per expert, tokens, z."""
  v = valid.astype(jnp.float32)
  n_experts = logits.shape[-1]
  chosen = jax.nn.one_hot(experts, n_experts, dtype=jnp.float32)  # (N, k, E)
  z = jax.nn.logsumexp(logits, axis=-1) ** 2  # (N,)
  return {"count": jnp.einsum("nke,n->e", chosen, v),
          "prob": jnp.einsum("ne,n->e", jax.nn.softmax(logits, axis=-1), v),
          "tokens": jnp.sum(v), "z": jnp.sum(z * v), "dropped": jnp.zeros((), jnp.float32)}


def router_losses(stats: RouterStats) -> tuple[Array, Array]:
  """(load-balancing loss, z-loss) of statistics stacked over sparse layers.

  The balancing loss is Switch's E * sum_e f_e P_e, with f_e the top-k assignments and P_e
  the router probability of expert e per token, both pooled over every layer's real tokens:
  transformers' `load_balancing_loss_func` on the same router logits and attention mask.
  """
  tokens = jnp.maximum(jnp.sum(stats["tokens"]), 1.0)
  count = jnp.sum(stats["count"].reshape(-1, stats["count"].shape[-1]), axis=0) / tokens
  prob = jnp.sum(stats["prob"].reshape(-1, stats["prob"].shape[-1]), axis=0) / tokens
  return count.shape[-1] * jnp.sum(count * prob), jnp.sum(stats["z"]) / tokens


class Experts(nn.Module):
  """The routed experts' weights, stacked: gate, up (swiglu) or wi (E, D, F), wo (E, F, D)."""

  cfg: TransformerConfig

  @nn.compact
  def __call__(self) -> dict[str, Array]:
    cfg = self.cfg
    e, d, f = cfg.moe.num_experts, cfg.d_model, cfg.expert_d_ff
    names = ("gate", "up") if cfg.mlp == "swiglu" else ("wi",)
    mup = cfg.width_mult ** 0.5  # µP: hidden matrices' std / sqrt(m), as `layers.dense`
    out_std = cfg.init_std / (2 * cfg.num_layers) ** 0.5  # GPT-2's depth-scaled residual init
    shapes = {**{n: ((e, d, f), ("expert", "embed", "mlp"), cfg.init_std) for n in names},
              "wo": ((e, f, d), ("expert", "mlp", "embed"), out_std)}
    # Named as dense layers' kernels (all in layers.HIDDEN): weight decay and µP's Adam
    # rates treat them alike.
    return {name: KernelParam(shape, axes, std / mup, cfg.weight_dtype, name=name)()
            for name, (shape, axes, std) in shapes.items()}


class KernelParam(nn.Module):
  """One named `kernel` parameter (so that weight decay and µP read it as a dense kernel)."""

  shape: tuple[int, ...]
  axes: tuple[str | None, ...]
  std: float
  dtype: Any

  @nn.compact
  def __call__(self) -> Array:
    return self.param("kernel", normal_init(self.std, self.axes), self.shape, self.dtype)


class MoeMlp(nn.Module):
  """A routed MLP: (B, T, D), valid (B, T) -> (B, T, D) and the layer's `RouterStats`.

  Padding tokens (valid False) reach no expert and count in no statistic. `decode`
  (cached generation) always dispatches dropless: a capacity computed from one step's few
  tokens would drop differently from the full forward pass.
  """

  cfg: TransformerConfig
  deterministic: bool = True
  decode: bool = False

  @nn.compact
  def __call__(self, x: Array, valid: Array) -> tuple[Array, RouterStats]:
    cfg, m = self.cfg, self.cfg.moe
    b, t, d = x.shape
    router = KernelParam((d, m.num_experts), ("embed", None), cfg.init_std, cfg.weight_dtype,
                         name="router")()  # (D, E)
    # The router in float32: top-k choices flip on rounding error in bfloat16.
    logits = x.reshape(-1, d).astype(jnp.float32) @ router.astype(jnp.float32)  # (N, E)
    weights, experts = route(logits, m.experts_per_token, m.router, m.normalize_topk)
    stats = router_stats(logits, experts, valid.reshape(-1))
    shape = (b, t, m.experts_per_token)
    kernels = Experts(cfg, name="experts")()
    if m.dispatch == "capacity" and not self.decode:
      y, dropped = moe_dispatch.capacity(x, experts.reshape(shape), weights.reshape(shape),
                                         valid, kernels, cfg)
      stats["dropped"] = dropped
    else:
      y = moe_dispatch.dropless(x, experts.reshape(shape), weights.reshape(shape), valid,
                                kernels, cfg)
    if cfg.shared_d_ff:  # always-on experts: a dense MLP every token passes through
      y = y + Mlp(cfg.replace(d_ff=cfg.shared_d_ff), True, name="shared")(x)
    y = nn.Dropout(cfg.dropout_rate)(y, deterministic=self.deterministic)
    return y, stats


# ------------------------------------------------------------------ what objectives read


def apply_with_router_stats(model: nn.Module, variables: dict[str, Any], *args, **kwargs
                            ) -> tuple[Any, RouterStats | None]:
  """`model.apply(variables, *args, **kwargs)` and, for a model with sparse layers, the
  router statistics it sowed (stacked over sparse layers); None for a dense model, whose
  call is exactly `model.apply`."""
  cfg = getattr(model, "cfg", None)
  if cfg is None or not any(cfg.sparse_layers):
    return model.apply(variables, *args, **kwargs), None
  out, state = model.apply(variables, *args, mutable=[COLLECTION], **kwargs)
  found = [v for v in jax.tree.leaves(state[COLLECTION], is_leaf=lambda x: isinstance(x, dict)
                                      and "count" in x)]
  return out, found[0]


def router_sums(sums: dict[str, Array], stats: RouterStats | None, cfg: TransformerConfig
                ) -> dict[str, Array]:
  """An objective's summed terms with the router's added: the weighted auxiliary losses
  join `objective` (each counted per unit of `weight`, so that dividing by the batch's total
  weight gives their mean over microbatches), `router_balance` and `router_z` report them,
  and per layer the assignments to each expert and the dropped ones (`router_load/...`,
  scalars: evaluation sums them over batches). Without statistics: `sums` unchanged."""
  if stats is None:
    return sums
  balance, z = router_losses(stats)
  w = sums["weight"]
  out = dict(sums)
  out["objective"] = sums["objective"] + (cfg.moe.balance_loss * balance
                                          + cfg.moe.z_loss * z) * w
  out["router_balance"], out["router_z"] = balance * w, z * w
  for i, layer in enumerate(_sparse_indices(cfg)):
    for e in range(cfg.moe.num_experts):
      out[f"router_load/layer{layer}/expert{e}"] = stats["count"][i, e]
    out[f"router_dropped/layer{layer}"] = stats["dropped"][i]
  return out


def _sparse_indices(cfg: TransformerConfig) -> list[int]:
  return [i for i, sparse in enumerate(cfg.sparse_layers) if sparse]


def router_metrics(sums: dict[str, Any]) -> dict[str, Any]:
  """The train line's router measures: the two auxiliary losses, per unit of weight."""
  if "router_balance" not in sums:
    return {}
  w = jnp.maximum(sums["weight"], 1.0)
  return {"router_balance": sums["router_balance"] / w, "router_z": sums["router_z"] / w}


def router_load_metrics(sums: dict[str, float]) -> dict[str, float]:
  """Evaluation's per-layer measures: each expert's share of the layer's assignments
  (1/E when balanced) and the share of assignments dropped over capacity."""
  return {key: value / max(_assignments(sums, key.split("/")[1]), 1.0)
          for key, value in sums.items() if key.startswith(("router_load/", "router_dropped/"))}


def _assignments(sums: dict[str, float], layer: str) -> float:
  return sum(v for k, v in sums.items() if k.startswith(f"router_load/{layer}/"))
