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
# Gemma 3's options, interleaved: local, local, global layers (window 3 on 8-token rows),
# sandwich (1 + w) norms, per-head qk-norm, local RoPE base, scaled embeddings, GeGLU,
# soft-capping, query_pre_attn_scalar, a yarn-scaled global RoPE.
GEMMA3 = dict(LLAMA, activation="gelu_tanh", tie_embeddings=True, norm_position="sandwich",
              norm_plus_one=True, qk_norm="head", embed_scale=True, sliding_window=3,
              layer_types=("local", "local", "global"), rope_local_theta=100.0,
              rope_scaling="yarn", rope_factor=4.0, rope_original_max_len=4, attn_softcap=5.0,
              final_softcap=4.0, attn_scale_dim=6.0, head_dim=16)
OLMO2 = dict(LLAMA, norm_position="branch_post", qk_norm="projection", qkv_bias=True)
FAMILIES = {"gpt2": GPT2, "llama": LLAMA, "bert": BERT, "gemma3": GEMMA3, "olmo2": OLMO2}


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


# Remat "full" on Gemma 3 (LLAMA's options and more: its layers' kinds as scanned data)
# covers it on LLaMA too.
@pytest.mark.parametrize("family,remat", [("gpt2", "none"), ("bert", "none"), ("llama", "none"),
                                          ("gpt2", "dots"), ("gemma3", "none"),
                                          ("gemma3", "full"), ("olmo2", "none")])
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


@pytest.mark.parametrize("impl", ["blockwise", "xla", "splash"])
def test_interleaved_local_and_global_layers_scanned_equal_unrolled(impl):
  """A scanned stack reads each layer's kind as data (a traced window, a lax.cond between
  splash kernels, a selected dense mask); unrolled, each layer's kind is fixed. Rows of 160
  tokens, window 40: local layers must differ from global ones."""
  cfg = TransformerConfig(**{**GEMMA3, "max_len": 160, "sliding_window": 40}, dtype="float32",
                          attention_impl=impl, scan_layers=False)
  tokens = jax.random.randint(jax.random.PRNGKey(1), (2, 160), 0, 64)
  segments = jnp.ones_like(tokens).at[1, 150:].set(0)
  model_u = build_model(cfg)
  params_u = unbox(model_u.init(jax.random.PRNGKey(0), tokens))["params"]
  model_s = build_model(cfg.replace(scan_layers=True))
  params_s = stack_layers(params_u, cfg.num_layers)
  valid = np.asarray(segments, bool)
  out_u = np.asarray(model_u.apply({"params": params_u}, tokens, segments))
  out_s = np.asarray(model_s.apply({"params": params_s}, tokens, segments))
  np.testing.assert_allclose(out_s[valid], out_u[valid], atol=2e-5, rtol=2e-5)
  every_global = build_model(cfg.replace(layer_types=("global",)))
  other = np.asarray(every_global.apply({"params": params_u}, tokens, segments))
  assert np.abs(other[valid] - out_u[valid]).max() > 1e-3


def _decode_all(cfg, params, sequences, prompt_lens, chunk):
  """Logits of every position of right-padded rows, from a KV cache filled as the decoder
  does: one call for the prompts (padded to `chunk`), then one token per call."""
  model = build_model(cfg, decode=True)
  b, total = sequences.shape
  dummy = jnp.zeros((b, total + chunk), jnp.int32)
  shapes = jax.eval_shape(lambda: model.apply({"params": params}, dummy,
                                              mutable=["cache"])[1]["cache"])
  cache = jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), shapes)
  step = jax.jit(lambda c, t, s, p: model.apply({"params": params, "cache": c}, t, s, p,
                                                mutable=["cache"]))
  lens = np.array(prompt_lens)
  seg = (np.arange(chunk)[None] < lens[:, None]).astype(np.int32)
  tokens = np.where(seg, sequences[:, :chunk], 0)
  logits, out = step(cache, tokens, seg, np.arange(chunk)[None] * seg)
  got = [[np.asarray(logits[i, j]) for j in range(n)] for i, n in enumerate(lens)]
  for t in range(total - lens.max()):
    pos = lens + t
    logits, out = step(out["cache"], sequences[np.arange(b), pos][:, None],
                       np.ones((b, 1), np.int32), pos[:, None])
    for i in range(b):
      got[i].append(np.asarray(logits[i, 0]))
  return got


@pytest.mark.parametrize("family,scan", [("gemma3", False), ("gemma3", True),
                                         ("mistral", False)])
def test_incremental_decoding_with_a_window_equals_the_full_forward_pass(family, scan):
  """Rows of 7 and 4 prompt tokens (window 3), then 17 tokens one at a time: each step's
  logits equal the full forward pass's at that position. Local layers see only their
  window in the cache (unrolled: a step reads just those slots), with their own RoPE base."""
  base = GEMMA3 if family == "gemma3" else dict(LLAMA, sliding_window=3)
  cfg = TransformerConfig(**{**base, "max_len": 64}, dtype="float32", scan_layers=scan)
  sequences = np.asarray(jax.random.randint(jax.random.PRNGKey(3), (2, 24), 0, 64))
  params = unbox(build_model(cfg).init(jax.random.PRNGKey(0), jnp.asarray(sequences)))["params"]
  full = np.asarray(build_model(cfg).apply({"params": params}, sequences))  # (B, T, V)
  got = _decode_all(cfg, params, sequences, [7, 4], chunk=8)
  for i in range(2):
    np.testing.assert_allclose(np.stack(got[i]), full[i, :len(got[i])], atol=2e-5, rtol=2e-5)
  unwindowed = build_model(cfg.replace(sliding_window=0, layer_types=()))
  other = np.asarray(unwindowed.apply({"params": params}, sequences))
  assert np.abs(other - full).max() > 1e-3  # the window mattered


@pytest.mark.parametrize("fields,message", [
    (dict(rope_scaling="dynamic"), "dynamic NTK.*not implemented"),
    (dict(rope_scaling="longrope"), "rope_scaling must be one of"),
    (dict(rope_scaling="llama3", rope_factor=8.0), "needs model.rope_original_max_len"),
    (dict(layer_types=("local", "global")), "local layers but model.sliding_window is 0"),
    (dict(sliding_window=4, layer_types=("local", "lokal")), "holds 'lokal'"),
    (dict(sliding_window=4, layer_types=("local",) * 5), "names 5 layers"),
    (dict(norm="layernorm", norm_plus_one=True), "needs model.norm='rmsnorm'"),
    (dict(qk_norm="all"), "qk_norm must be one of"),
    (dict(norm_position="middle"), "norm_position must be one of"),
    (dict(attn_softcap=-1.0), "attn_softcap must be >= 0"),
    (dict(family="encoder", sliding_window=4), "sliding_window is for causal decoders"),
])
def test_bad_family_options_are_one_line(fields, message):
  with pytest.raises(ValueError, match=message):
    TransformerConfig(**{**LLAMA, **fields})


def test_family_options_default_to_the_plain_model_and_read_back_from_json():
  import dataclasses
  import json
  cfg = TransformerConfig(**GEMMA3)
  again = TransformerConfig(**json.loads(json.dumps(dataclasses.asdict(cfg))))
  assert again == cfg and again.layer_types == ("local", "local", "global")
  assert cfg.local_layers == (True, True, False) and cfg.uniform_layers is None
  plain = TransformerConfig(**LLAMA)
  assert plain.local_layers == (False,) * 3 and plain.uniform_layers is False
  assert TransformerConfig(**LLAMA, sliding_window=5).uniform_layers is True


def test_qkv_bias_and_qk_norm_parameters():
  _, params = _init(TransformerConfig(**OLMO2))
  attn = params["transformer"]["stack"]["layers"]["attention"]
  assert attn["query"]["bias"].shape == (3, 4, 8) and "bias" not in attn["out"]
  assert attn["query_norm"]["norm"]["scale"].shape == (3, 32)  # the whole projection, H*Dh
  assert attn["key_norm"]["norm"]["scale"].shape == (3, 16)
  _, gemma = _init(TransformerConfig(**GEMMA3))
  layers = gemma["transformer"]["stack"]["layers"]
  assert layers["attention"]["query_norm"]["norm"]["scale"].shape == (3, 16)  # per head
  assert set(layers) >= {"attention_norm", "attention_post_norm", "mlp_norm", "mlp_post_norm"}
  assert not np.any(layers["mlp_post_norm"]["norm"]["scale"])  # (1 + w): w starts at 0


def test_final_softcap_bounds_the_logits_and_the_fused_head_carries_it():
  model, params = _init(TransformerConfig(**{**GEMMA3, "final_softcap": 0.5}))
  logits = model.apply({"params": params}, *_inputs())
  assert np.abs(np.asarray(logits)).max() < 0.5
  head = model.apply({"params": params}, *_inputs(), project=False)
  assert head.softcap == 0.5  # the fused loss caps its chunks' logits itself
  np.testing.assert_allclose(head.logits(), logits, rtol=1e-6)
