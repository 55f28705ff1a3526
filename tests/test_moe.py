"""The routed MLP (lmjax.model.moe, moe_dispatch): routing, the auxiliary losses against
transformers', every dispatch against a dense reference, capacity drops, which layers are
sparse, and bad input. Training, resuming and generating with it: test_moe_runs.py."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from lmjax.model import TransformerConfig, build_model
from lmjax.model.config import MoEConfig
from lmjax.model.layers import ACTIVATIONS
from lmjax.model.moe import MoeMlp, route, router_losses, router_stats
from lmjax.model.moe_dispatch import grouped_matmul
from lmjax.sharding import unbox

E, K, D, F = 4, 2, 16, 24


def _cfg(mlp="swiglu", model=None, **moe):
  act = "silu" if mlp == "swiglu" else "gelu_tanh"
  fields = {**dict(vocab_size=64, d_model=D, num_heads=2, num_layers=2, d_ff=32, mlp=mlp,
                   activation=act, dtype="float32"), **(model or {})}
  return TransformerConfig(**fields, moe=MoEConfig(num_experts=E, experts_per_token=K, d_ff=F,
                                                   **moe))


def _logits(n=12, seed=0):
  return jax.random.normal(jax.random.PRNGKey(seed), (n, E)) * 2


def test_routers_weigh_the_top_k_as_documented():
  logits = _logits()
  probs = np.asarray(jax.nn.softmax(logits))
  top = np.argsort(-probs, axis=-1)[:, :K]
  p_top = np.take_along_axis(probs, top, -1)
  for router, normalize, want in (
      ("softmax_topk", False, p_top),  # Qwen3-MoE, OLMoE with norm_topk_prob false
      ("softmax_topk", True, p_top / p_top.sum(-1, keepdims=True)),  # Mixtral
      ("topk_softmax", False, p_top / p_top.sum(-1, keepdims=True))):
    weights, experts = route(logits, K, router, normalize)
    np.testing.assert_array_equal(np.asarray(experts), top)
    np.testing.assert_allclose(np.asarray(weights), want, rtol=1e-6)


def test_balance_loss_equals_transformers_and_z_loss_is_the_mean_squared_lse():
  """Three layers' router logits over 2 rows of 6 tokens, one padded: lmjax's pooled
  statistics give transformers' `load_balancing_loss_func` with the attention mask."""
  from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func
  mask = np.ones((2, 6), np.int32)
  mask[1, 4:] = 0
  layers = [_logits(12, seed) for seed in range(3)]
  stats = [router_stats(x, route(x, K, "softmax_topk", True)[1], jnp.asarray(mask.reshape(-1)))
           for x in layers]
  stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *stats)
  balance, z = router_losses(stacked)
  want = load_balancing_loss_func(tuple(torch.tensor(np.asarray(x)) for x in layers), E, K,
                                  torch.tensor(mask))
  np.testing.assert_allclose(float(balance), float(want), rtol=1e-5)
  valid = mask.reshape(-1).astype(bool)
  lse = np.concatenate([np.asarray(jax.nn.logsumexp(x, axis=-1))[valid] for x in layers])
  np.testing.assert_allclose(float(z), np.mean(lse ** 2), rtol=1e-5)


def _every_expert(cfg, params, x):
  """Every expert on every token: (E, N, D)."""
  kern = {k: v["kernel"] for k, v in params["experts"].items()}
  act = ACTIVATIONS[cfg.activation]
  xs = x.reshape(-1, D)
  if cfg.mlp == "swiglu":
    h = act(jnp.einsum("nd,edf->enf", xs, kern["gate"])) * jnp.einsum("nd,edf->enf", xs,
                                                                       kern["up"])
  else:
    h = act(jnp.einsum("nd,edf->enf", xs, kern["wi"]))
  return jnp.einsum("enf,efd->end", h, kern["wo"])


def _reference(cfg, params, x, valid, keep=None):
  """The chosen experts' outputs (of those `keep` (N, k) marks), weighted and summed."""
  m = cfg.moe
  logits = x.reshape(-1, D) @ params["router"]["kernel"]
  weights, experts = route(logits, m.experts_per_token, m.router, m.normalize_topk)
  weights = weights if keep is None else weights * keep
  gate = jnp.sum(jax.nn.one_hot(experts, m.num_experts) * weights[..., None], axis=1)  # (N, E)
  out = jnp.einsum("end,ne->nd", _every_expert(cfg, params, x), gate) * valid.reshape(-1, 1)
  return out.reshape(x.shape)


def _layer(cfg, seed=1):
  x = jax.random.normal(jax.random.PRNGKey(seed), (3, 10, D))
  valid = jnp.ones((3, 10), bool).at[2, 7:].set(False)
  layer = MoeMlp(cfg)
  params = unbox(layer.init(jax.random.PRNGKey(0), x, valid))["params"]
  return layer, params, x, valid


@pytest.mark.parametrize("mlp", ["swiglu", "gelu"])
@pytest.mark.parametrize("moe", [dict(grouped_matmul="tiled"), dict(grouped_matmul="ragged_dot"),
                                 dict(dispatch="capacity", capacity_factor=float(E)),
                                 dict(router="topk_softmax", grouped_matmul="tiled")])
def test_every_dispatch_equals_a_dense_reference(mlp, moe):
  """Dropless (both grouped matmuls) and capacity dispatch with room for every token give
  what running every expert on every token gives; padding tokens get nothing and count
  in no statistic."""
  cfg = _cfg(mlp, **moe)
  layer, params, x, valid = _layer(cfg)
  y, stats = layer.apply({"params": params}, x, valid)
  np.testing.assert_allclose(np.asarray(y), np.asarray(_reference(cfg, params, x, valid)),
                             atol=2e-5, rtol=1e-4)
  assert float(stats["tokens"]) == 27 and float(jnp.sum(stats["count"])) == 27 * K
  assert float(stats["dropped"]) == 0


@pytest.mark.parametrize("impl", ["tiled", "ragged_dot"])
def test_dropless_gradients_equal_the_dense_reference_and_need_no_scatter(impl):
  """The sorted dispatch moves rows by gathers whose gradients are gathers too
  (`take_rows`): the gradients of the input and of every parameter equal the reference's,
  and with ragged_dot (TPU's grouped matmul; `tiled` is CPU's) the gradient program has no
  scatter (XLA:TPU sorts a scatter and emits it row window by row window: slow to compile)."""
  cfg = _cfg(grouped_matmul=impl)
  layer, params, x, valid = _layer(cfg)
  w = jax.random.normal(jax.random.PRNGKey(3), x.shape)
  loss = lambda p, x: jnp.sum(layer.apply({"params": p}, x, valid)[0] * w)
  ref = lambda p, x: jnp.sum(_reference(cfg, p, x, valid) * w)
  got, want = jax.grad(loss, argnums=(0, 1))(params, x), jax.grad(ref, argnums=(0, 1))(params, x)
  for g, r in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(np.asarray(g), np.asarray(r), atol=1e-4, rtol=1e-4)
  program = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(params, x).as_text()
  assert "gather" in program and ("scatter" not in program or impl == "tiled")


def test_capacity_drops_assignments_over_capacity_and_counts_them():
  """Capacity ceil(0.5 * 10 * 2 / 4) = 3 per expert and row, first choices placed before
  second ones: the dropped assignments are those past 3 in that order, and a token keeps
  only its kept experts' outputs."""
  cfg = _cfg(dispatch="capacity", capacity_factor=0.5)
  layer, params, x, valid = _layer(cfg)
  y, stats = layer.apply({"params": params}, x, valid)
  logits = x.reshape(-1, D) @ params["router"]["kernel"]
  experts = np.asarray(route(logits, K, "softmax_topk", True)[1]).reshape(3, 10, K)
  keep = np.zeros((3, 10, K), bool)
  for b in range(3):
    used = np.zeros(E, int)
    for k in range(K):  # first choices first, then in token order
      for t in range(10):
        if valid[b, t] and used[experts[b, t, k]] < 3:
          keep[b, t, k] = True
          used[experts[b, t, k]] += 1
  dropped = int(np.asarray(valid)[..., None].repeat(K, -1).sum() - keep.sum())
  assert dropped > 0 and float(stats["dropped"]) == dropped
  want = _reference(cfg, params, x, valid, keep.reshape(-1, K))
  np.testing.assert_allclose(np.asarray(y), np.asarray(want), atol=2e-5, rtol=1e-4)


def test_grouped_matmuls_agree_with_empty_groups_and_rows_past_the_total():
  a = jax.random.normal(jax.random.PRNGKey(0), (40, 8))
  w = jax.random.normal(jax.random.PRNGKey(1), (5, 8, 6))
  sizes = jnp.array([7, 0, 20, 0, 9], jnp.int32)  # 36 rows; the last 4 belong to none
  want = np.concatenate([np.asarray(a[s:s + n] @ w[g]) for g, (s, n) in enumerate(
      zip(np.cumsum(sizes) - sizes, sizes))] + [np.zeros((4, 6))])
  for impl in ("tiled", "ragged_dot"):
    np.testing.assert_allclose(np.asarray(grouped_matmul(a, w, sizes, impl)), want,
                               atol=1e-5, rtol=1e-5)


def test_sparse_layers_shared_experts_and_their_parameters():
  unrolled = dict(scan_layers=False, num_layers=4)
  every2 = _cfg(model=unrolled, every=2)
  assert every2.sparse_layers == (False, True, False, True)
  listed = _cfg(model=unrolled, layers=(0, 3))
  assert listed.sparse_layers == (True, False, False, True)
  shared = _cfg(model=dict(scan_layers=False), shared_experts=2)
  assert shared.shared_d_ff == 2 * F
  params = jax.eval_shape(build_model(shared).init, jax.random.PRNGKey(0),
                          jnp.zeros((1, 8), jnp.int32))["params"]
  mlp = unbox(params)["transformer"]["stack"]["layers_0"]["mlp"]
  assert mlp["experts"]["gate"]["kernel"].shape == (E, D, F)
  assert mlp["experts"]["wo"]["kernel"].shape == (E, F, D)
  assert mlp["router"]["kernel"].shape == (D, E)
  assert mlp["shared"]["gate"]["kernel"].shape == (D, 2 * F)
  dense = unbox(jax.eval_shape(build_model(every2).init, jax.random.PRNGKey(0),
                               jnp.zeros((1, 8), jnp.int32))["params"])["transformer"]["stack"]
  assert "experts" not in dense["layers_0"]["mlp"] and "experts" in dense["layers_1"]["mlp"]


@pytest.mark.parametrize("moe,message", [
    (dict(num_experts=4, experts_per_token=5), "model.moe.experts_per_token=5 exceeds "
     "model.moe.num_experts=4"),
    (dict(num_experts=4, capacity_factor=0.0), "model.moe.capacity_factor"),
    (dict(num_experts=4, capacity_factor=-1.0), "model.moe.capacity_factor"),
    (dict(num_experts=4, router="sinkhorn"), "model.moe.router must be one of"),
    (dict(num_experts=4, layers=(7,)), "model.moe.layers names layer 7"),
])
def test_bad_moe_settings_are_one_line(moe, message):
  from lmjax.errors import UserError
  from lmjax.experiment import experiment_from_dict, default_config
  config = default_config()
  config["model"] = {**config["model"], "moe": moe, "num_layers": 2, "scan_layers": False}
  with pytest.raises(UserError, match=message) as e:
    experiment_from_dict(config)
  assert "\n" not in str(e.value)
