import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lmjax.model import TransformerConfig, build_model, stack_layers, unstack_layers
from lmjax.sharding import unbox

GPT2 = dict(family="decoder", vocab_size=64, max_len=16, d_model=32, num_layers=3, num_heads=4,
            d_ff=64)
LLAMA = dict(GPT2, position="rope", norm="rmsnorm", mlp="swiglu", activation="silu",
             num_kv_heads=2, use_bias=False, tie_embeddings=False)
BERT = dict(GPT2, family="encoder", norm_position="post", embedding_norm=True,
            activation="gelu_exact", type_vocab_size=2)
FAMILIES = {"gpt2": GPT2, "llama": LLAMA, "bert": BERT}


def _inputs():
  tokens = jax.random.randint(jax.random.PRNGKey(1), (2, 8), 0, 64)
  segments = jnp.array([[1, 1, 1, 2, 2, 2, 2, 0], [1] * 8])
  positions = jnp.array([[0, 1, 2, 0, 1, 2, 3, 0], list(range(8))])
  return tokens, segments, positions


def _init(cfg):
  model = build_model(cfg)
  tokens, segments, positions = _inputs()
  params = unbox(jax.jit(model.init)(jax.random.PRNGKey(0), tokens))["params"]
  return model, params


@pytest.mark.parametrize("family,remat", [("gpt2", "none"), ("bert", "none"), ("llama", "none"),
                                          ("llama", "full"), ("gpt2", "dots")])
def test_scan_equals_unrolled(family, remat):
  unrolled_cfg = TransformerConfig(**FAMILIES[family], scan_layers=False, remat_policy=remat)
  model_u, params_u = _init(unrolled_cfg)
  model_s = build_model(unrolled_cfg.replace(scan_layers=True))
  params_s = stack_layers(params_u, unrolled_cfg.num_layers)
  inputs = _inputs()
  np.testing.assert_allclose(model_u.apply({"params": params_u}, *inputs),
                             model_s.apply({"params": params_s}, *inputs), atol=1e-5)
  loss = lambda m, p: jnp.sum(m.apply({"params": p}, *inputs) ** 2) * 1e-3
  g_u = stack_layers(jax.grad(lambda p: loss(model_u, p))(params_u), unrolled_cfg.num_layers)
  g_s = jax.grad(lambda p: loss(model_s, p))(params_s)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-4), g_u, g_s)
  back = unstack_layers(params_s, unrolled_cfg.num_layers)
  jax.tree.map(np.testing.assert_array_equal, back, params_u)


def test_scanned_init_matches_stacked_shapes():
  cfg = TransformerConfig(**LLAMA)
  _, p_scan = _init(cfg)
  _, p_unrolled = _init(cfg.replace(scan_layers=False))
  shapes = lambda t: jax.tree.map(lambda x: x.shape, t)
  assert shapes(p_scan) == shapes(stack_layers(p_unrolled, cfg.num_layers))


@pytest.mark.parametrize("family", FAMILIES)
def test_every_parameter_has_logical_axis_names(family):
  for scan in (True, False):
    cfg = TransformerConfig(**FAMILIES[family], scan_layers=scan)
    variables = jax.eval_shape(build_model(cfg).init, jax.random.PRNGKey(0), _inputs()[0])
    leaves = jax.tree.leaves(variables["params"], is_leaf=lambda x: isinstance(x, nn.Partitioned))
    for leaf in leaves:
      assert isinstance(leaf, nn.LogicallyPartitioned), leaf
      assert len(leaf.names) == len(leaf.value.shape)
      if scan and "layers" in leaf.names:
        assert leaf.names[0] == "layers"


def test_bfloat16_compute_keeps_float32_params():
  cfg = TransformerConfig(**LLAMA, dtype="bfloat16")
  model, params = _init(cfg)
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(params))
  logits = model.apply({"params": params}, *_inputs())
  assert logits.dtype == jnp.float32
  ref_model, _ = _init(cfg.replace(dtype="float32"))
  ref = ref_model.apply({"params": params}, *_inputs())
  np.testing.assert_allclose(logits, ref, atol=0.1)  # bf16 rounding only


def test_gqa_projection_shapes_and_untied_head():
  _, params = _init(TransformerConfig(**LLAMA))
  attn = params["transformer"]["stack"]["layers"]["attention"]
  assert attn["query"]["kernel"].shape == (3, 32, 4, 8)  # (L, D, H, Dh)
  assert attn["key"]["kernel"].shape == (3, 32, 2, 8)  # (L, D, K, Dh)
  assert params["lm_head"]["kernel"].shape == (32, 64)


def test_documents_are_independent_in_packed_rows():
  """A document's logits do not depend on the other documents packed in its row."""
  for family in FAMILIES:
    model, params = _init(TransformerConfig(**FAMILIES[family]))
    tokens, segments, positions = _inputs()
    other = tokens.at[0, :3].set((tokens[0, :3] + 7) % 64)  # change document 1 only
    a = model.apply({"params": params}, tokens, segments, positions)
    b = model.apply({"params": params}, other, segments, positions)
    np.testing.assert_allclose(a[0, 3:7], b[0, 3:7], atol=1e-5)


def test_causal_logits_do_not_see_the_future():
  model, params = _init(TransformerConfig(**GPT2))
  tokens, _, _ = _inputs()
  changed = tokens.at[:, 5].set((tokens[:, 5] + 1) % 64)
  a, b = model.apply({"params": params}, tokens), model.apply({"params": params}, changed)
  np.testing.assert_allclose(a[:, :5], b[:, :5], atol=1e-6)
  assert not np.allclose(a[:, 5:], b[:, 5:])


@pytest.mark.parametrize("family", ["bert", "gpt2"])
def test_head_on_gathered_positions_equals_full_logits(family):
  model, params = _init(TransformerConfig(**FAMILIES[family]))
  predict_at = jnp.array([[6, 0, 3], [2, 2, 7]])  # (B, K) as the MLM targets are gathered
  full = model.apply({"params": params}, *_inputs())  # (B, T, V)
  gathered = model.apply({"params": params}, *_inputs(), predict_at=predict_at)  # (B, K, V)
  assert gathered.shape == (2, 3, 64)
  np.testing.assert_allclose(gathered, np.take_along_axis(full, predict_at[..., None], 1),
                             rtol=1e-5, atol=1e-5)


def test_auto_dtype_is_bfloat16_on_accelerators_float32_on_cpu(monkeypatch):
  cfg = TransformerConfig(**GPT2)
  assert cfg.dtype == "auto" and cfg.compute_dtype == jnp.float32  # the tests run on CPU
  for backend in ("gpu", "tpu"):
    monkeypatch.setattr(jax, "default_backend", lambda b=backend: b)
    assert cfg.compute_dtype == jnp.bfloat16 and cfg.weight_dtype == jnp.float32
