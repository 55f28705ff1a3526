import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lmjax.model.attention import attention, make_attention_mask


def test_causal_mask_is_lower_triangular():
  seg = jnp.ones((1, 4), jnp.int32)
  mask = np.asarray(make_attention_mask(seg, causal=True))[0, 0]
  np.testing.assert_array_equal(mask, np.tril(np.ones((4, 4), bool)))


def test_bidirectional_mask_with_padding():
  seg = jnp.array([[1, 1, 1, 0]])
  mask = np.asarray(make_attention_mask(seg, causal=False))[0, 0]
  expected = np.zeros((4, 4), bool)
  expected[:3, :3] = True  # padding neither attends nor is attended to
  np.testing.assert_array_equal(mask, expected)


def test_packed_documents_do_not_attend_across():
  seg = jnp.array([[1, 1, 2, 2, 2]])
  mask = np.asarray(make_attention_mask(seg, causal=True))[0, 0]
  assert not mask[2:, :2].any()  # document 2 never sees document 1
  assert mask[3, 2] and mask[4, 3] and not mask[2, 3]


def test_prefix_lm_mask():
  seg = jnp.ones((1, 5), jnp.int32)
  mask = np.asarray(make_attention_mask(seg, causal=True, prefix_len=jnp.array([3])))[0, 0]
  assert mask[:3, :3].all()  # prefix is bidirectional
  assert not mask[3, 4] and mask[4, 3] and mask[3, 0]  # the rest is causal


@pytest.mark.parametrize("kv_heads", [4, 2, 1])
@pytest.mark.parametrize("causal", [True, False])
def test_xla_attention_equals_reference(kv_heads, causal):
  kq, kk, kv = jax.random.split(jax.random.PRNGKey(0), 3)
  q = jax.random.normal(kq, (2, 6, 4, 8))
  k = jax.random.normal(kk, (2, 6, kv_heads, 8))
  v = jax.random.normal(kv, (2, 6, kv_heads, 8))
  seg = jnp.array([[1, 1, 1, 2, 2, 0], [1, 1, 1, 1, 1, 1]])
  mask = make_attention_mask(seg, causal)
  ref = attention(q, k, v, mask, "reference")
  xla = attention(q, k, v, mask, "xla")
  valid = np.asarray(seg != 0)  # padded query rows are ignored downstream
  np.testing.assert_allclose(np.asarray(ref)[valid], np.asarray(xla)[valid], atol=1e-5, rtol=1e-5)


# Blockwise and splash attention against `reference`: a packed row (three documents and
# padding, 37 tokens: not a multiple of any block) and a one-document row.
def _inputs(kv_heads, t=37, heads=4, dim=8):
  kq, kk, kv, kw = jax.random.split(jax.random.PRNGKey(0), 4)
  q = jax.random.normal(kq, (2, t, heads, dim))
  k = jax.random.normal(kk, (2, t, kv_heads, dim))
  v = jax.random.normal(kv, (2, t, kv_heads, dim))
  row = [1] * (t * 3 // 10) + [2] * (t // 2)
  row += [3] * (t - 2 - len(row)) + [0, 0]
  seg = jnp.array([row, [1] * t])
  return q, k, v, seg, jax.random.normal(kw, q.shape)


def _assert_matches_reference(fn, q, k, v, seg, w, causal, prefix_len=None, tol=1e-5,
                              window=None, scale=None, softcap=0.0):
  """Values on real tokens, and gradients of q, k, v through a loss over real tokens."""
  mask = make_attention_mask(seg, causal, prefix_len, window=window)
  valid = (seg != 0)[:, :, None, None]  # padded query rows are ignored downstream
  ref = lambda q, k, v: attention(q, k, v, mask, "reference", scale=scale, softcap=softcap)
  loss = lambda f: lambda q, k, v: jnp.sum(jnp.where(valid, f(q, k, v), 0.0) * w)
  np.testing.assert_allclose(np.where(valid, fn(q, k, v), 0), np.where(valid, ref(q, k, v), 0),
                             atol=tol, rtol=tol)
  grads = jax.grad(loss(fn), argnums=(0, 1, 2))(q, k, v)
  expected = jax.grad(loss(ref), argnums=(0, 1, 2))(q, k, v)
  for name, got, want in zip("qkv", grads, expected):
    np.testing.assert_allclose(got, want, atol=10 * tol, rtol=10 * tol, err_msg=f"d{name}")


# Blocks of 16x8 and 8x16 over 37 tokens: several partial, skipped and diagonal blocks;
# 64x64: one block longer than the row, taken by the path that keeps its probabilities
# (SAVED_PROBS_MAX_LEN). GQA (two query heads per KV head) for every mask and block shape;
# MHA (a group of one, the same code with the group axis 1) once per block shape, each
# with another mask.
@pytest.mark.parametrize("mode,kv_heads,blocks", [
    *[(mode, 2, blocks) for mode in ("causal", "bidirectional", "prefix")
      for blocks in ((16, 8), (8, 16), (64, 64))],
    ("causal", 4, (16, 8)), ("prefix", 4, (8, 16)), ("bidirectional", 4, (64, 64))])
def test_blockwise_attention_equals_reference(mode, kv_heads, blocks):
  from lmjax.model.blockwise import blockwise_attention
  q, k, v, seg, w = _inputs(kv_heads)
  causal = mode != "bidirectional"
  prefix = jnp.array([5, 13]) if mode == "prefix" else None
  fn = lambda q, k, v: blockwise_attention(q, k, v, seg, causal, prefix, *blocks)
  _assert_matches_reference(jax.jit(fn), q, k, v, seg, w, causal, prefix)


@pytest.mark.parametrize("mode", ["causal", "prefix"])
def test_short_rows_with_bfloat16_matmul_operands_match_reference(mode):
  """model.dtype=bfloat16_matmuls: float32 q, k, v; the one-block path's matmuls take
  bfloat16 operands. Values and gradients within bfloat16's rounding of `reference`."""
  from lmjax.model.blockwise import blockwise_attention
  q, k, v, seg, w = _inputs(2)
  prefix = jnp.array([5, 13]) if mode == "prefix" else None
  fn = lambda q, k, v: blockwise_attention(q, k, v, seg, True, prefix,
                                           matmul_dtype=jnp.bfloat16)
  assert fn(q, k, v).dtype == jnp.float32
  _assert_matches_reference(jax.jit(fn), q, k, v, seg, w, True, prefix, tol=2e-2)


def test_blockwise_attention_never_reads_blocks_it_may_not_see():
  """NaN values in key blocks that are above the causal diagonal, or belong only to
  another document, would poison any row that touched them (0 * NaN = NaN)."""
  from lmjax.model.blockwise import blockwise_attention
  t, block = 64, 16
  q, k, v, _, _ = _inputs(2, t=t)
  seg = jnp.array([[1] * 32 + [2] * 32] * 2)  # two documents, two blocks each
  v = v.at[:, 16:32].set(jnp.nan).at[:, 48:].set(jnp.nan)  # doc 1's second block; the last
  out = blockwise_attention(q, k, v, seg, True, None, block, block)
  assert np.isfinite(np.asarray(out[:, :16])).all()  # rows that only see the first block
  assert np.isfinite(np.asarray(out[:, 32:48])).all()  # doc 2, first block: skips doc 1's
  assert np.isnan(np.asarray(out[:, 16:32])).all()  # the poisoned block itself is read


def test_blockwise_attention_memory_is_linear_in_length():
  from lmjax.model.blockwise import blockwise_attention
  def temporaries(impl, t):
    q = jax.ShapeDtypeStruct((1, t, 4, 32), jnp.float32)
    seg = jnp.ones((1, t), jnp.int32)
    mask = make_attention_mask(seg, True)
    f = {"blockwise": lambda q, k, v: blockwise_attention(q, k, v, seg, True, None, 256, 256),
         "xla": lambda q, k, v: attention(q, k, v, mask, "xla")}[impl]
    grad = jax.jit(jax.grad(lambda q, k, v: f(q, k, v).sum(), argnums=(0, 1, 2)))
    return grad.lower(q, q, q).compile().memory_analysis().temp_size_in_bytes
  blockwise = temporaries("blockwise", 2048) / temporaries("blockwise", 1024)
  dense = temporaries("xla", 2048) / temporaries("xla", 1024)
  assert blockwise < 2.5 and dense > 3.5, (blockwise, dense)


@pytest.mark.parametrize("causal,kv_heads", [(True, 4), (True, 1), (False, 2)])
def test_splash_attention_in_interpret_mode_equals_reference(causal, kv_heads):
  """The TPU kernel, run by the Pallas interpreter on CPU: 200 tokens pad to 256."""
  from lmjax.model.splash import splash_attention
  q, k, v, seg, w = _inputs(kv_heads, t=200)
  fn = lambda q, k, v: splash_attention(q, k, v, seg, causal)
  _assert_matches_reference(fn, q, k, v, seg, w, causal, tol=2e-5)


def test_splash_refuses_a_prefix_lm_mask():
  from lmjax.model.splash import splash_attention
  q, k, v, seg, _ = _inputs(4, t=128)
  with pytest.raises(ValueError, match="cannot express a prefix-LM mask.*blockwise"):
    splash_attention(q, k, v, seg, True, jnp.array([3, 4]))


@pytest.mark.parametrize("family", ["decoder", "encoder", "windowed"])
def test_every_implementation_gives_the_same_model(family):
  """The Transformer hands each implementation its mask in the form it reads; `windowed`:
  local and global layers (window 20, scanned: the kind is data), soft-capped scores."""
  from lmjax.model import TransformerConfig, build_model
  options = dict(sliding_window=20, layer_types=("local", "global"), attn_softcap=3.0,
                 attn_scale_dim=4.0) if family == "windowed" else {}
  cfg = TransformerConfig(family="encoder" if family == "encoder" else "decoder",
                          vocab_size=64, max_len=128, d_model=32, num_layers=2, num_heads=4,
                          num_kv_heads=2, d_ff=64, dtype="float32", **options)
  tokens = jax.random.randint(jax.random.PRNGKey(1), (2, 128), 0, 64)
  seg = jnp.concatenate([jnp.ones((2, 50), jnp.int32), jnp.full((2, 78), 2)], axis=1)
  params = build_model(cfg).init(jax.random.PRNGKey(0), tokens, seg)
  outs = {impl: build_model(cfg.replace(attention_impl=impl)).apply(params, tokens, seg)
          for impl in ("reference", "xla", "blockwise", "splash")}
  for impl, out in outs.items():
    np.testing.assert_allclose(out, outs["reference"], atol=2e-4, rtol=2e-4, err_msg=impl)


def test_window_mask_is_transformers_sliding_window():
  """A query sees the `window` keys ending at itself: k > q - window (masking_utils'
  sliding_window_overlay), within its document."""
  seg = jnp.array([[1] * 9 + [2] * 3])
  mask = np.asarray(make_attention_mask(seg, causal=True, window=4))[0, 0]
  q, k = np.arange(12)[:, None], np.arange(12)[None, :]
  same_doc = (q < 9) == (k < 9)
  np.testing.assert_array_equal(mask, (k <= q) & (k > q - 4) & same_doc)
  assert mask[:9].sum(-1).tolist() == [1, 2, 3, 4, 4, 4, 4, 4, 4]


# Windows of 5 (inside a block) and 20 (across several 8- and 16-wide blocks), with and
# without soft-capping and a scale of their own (Gemma's query_pre_attn_scalar); the
# window as a Python int and as a traced value (a scanned stack of mixed layers). Each
# block shape takes a Python and a traced window, one of them soft-capped; each of the four
# window settings runs on a multi-block shape (the one-block 64x64 path masks a single
# block, its window 5 and 20 alike).
@pytest.mark.parametrize("blocks,window,softcap,traced", [
    ((16, 8), 20, 2.0, False), ((16, 8), 20, 0.0, True),
    ((8, 16), 5, 0.0, False), ((8, 16), 5, 3.0, True),
    ((64, 64), 20, 2.0, False), ((64, 64), 20, 0.0, True)])
def test_blockwise_sliding_window_and_softcap_equal_reference(blocks, window, softcap, traced):
  from lmjax.model.blockwise import blockwise_attention
  q, k, v, seg, w = _inputs(2)
  scale = 0.2 if softcap else None

  def fn(q, k, v, win):
    return blockwise_attention(q, k, v, seg, True, None, *blocks, window=win, scale=scale,
                               softcap=softcap)
  if traced:
    run = lambda q, k, v: jax.jit(fn)(q, k, v, jnp.int32(window))
  else:
    run = jax.jit(lambda q, k, v: fn(q, k, v, window))
  _assert_matches_reference(run, q, k, v, seg, w, True, window=window, scale=scale,
                            softcap=softcap)


def test_blockwise_window_loop_bounds_are_the_visible_blocks():
  """The loops over key blocks (forward) and query blocks (backward) start and end exactly
  at the first and last block holding a visible pair: the blocks behind the window are
  never visited, the speed of a sliding window (benchmarks/window.py)."""
  from lmjax.model.blockwise import _first_key_block, _key_blocks, _query_blocks
  for bq, bk, window, t in ((16, 16, 8, 96), (16, 8, 20, 96), (8, 16, 5, 64), (32, 32, 100, 96)):
    mask = np.asarray(make_attention_mask(jnp.ones((1, t), jnp.int32), True, window=window))[0, 0]
    seen = mask.reshape(t // bq, bq, t // bk, bk).any(axis=(1, 3))  # (query block, key block)
    for i in range(t // bq):
      visible = np.flatnonzero(seen[i])
      assert int(_first_key_block(i, bq, bk, jnp.int32(window))) == visible[0]
      assert _key_blocks(i, bq, bk, t // bk, True, None) == visible[-1] + 1
    for j in range(t // bk):
      assert int(_query_blocks(j, bq, bk, t // bq, jnp.int32(window))) == np.flatnonzero(
          seen[:, j])[-1] + 1


def test_blockwise_window_keeps_behind_window_values_out():
  """NaN values in the first block of 16 poison the query blocks that visit it (0 and 1,
  whose window reaches it) and nothing after."""
  from lmjax.model.blockwise import blockwise_attention
  q, k, v, _, _ = _inputs(2, t=64)
  seg = jnp.ones((2, 64), jnp.int32)
  out = blockwise_attention(q, k, v.at[:, :16].set(jnp.nan), seg, True, None, 16, 16, window=8)
  assert np.isnan(np.asarray(out[:, :32])).all() and np.isfinite(np.asarray(out[:, 32:])).all()


@pytest.mark.parametrize("window,softcap", [(40, 0.0), (200, 3.0)])
def test_splash_local_mask_and_softcap_in_interpret_mode_equal_reference(window, softcap):
  """Splash's own LocalMask (it skips blocks outside the window) and logit soft-cap."""
  from lmjax.model.splash import splash_attention
  q, k, v, seg, w = _inputs(2, t=200)
  fn = lambda q, k, v: splash_attention(q, k, v, seg, True, window=window, scale=0.3,
                                        softcap=softcap)
  _assert_matches_reference(fn, q, k, v, seg, w, True, tol=2e-5, window=window, scale=0.3,
                            softcap=softcap)


def test_dense_implementations_take_the_window_in_the_mask_and_cudnn_as_an_argument(
    monkeypatch):
  """cuDNN cannot run on CPU: what lmjax passes it is checked at trace level. The mask holds
  the window; `local_window_size=(window - 1, 0)` lets cuDNN skip (its `sliding_window_length`
  is then window, exclusive); a traced layer kind traces both variants under a lax.cond."""
  from lmjax.model.masks import MaskSpec
  q, k, v, seg, _ = _inputs(2, t=32)
  calls = []

  def fake(q, k, v, mask=None, scale=None, implementation=None, local_window_size=None):
    calls.append((implementation, local_window_size, np.asarray(mask) if not isinstance(
        mask, jax.core.Tracer) else None))
    return jnp.zeros_like(q)
  monkeypatch.setattr(jax.nn, "dot_product_attention", fake)
  spec = MaskSpec(seg, None, True)
  attention(q, k, v, spec, "cudnn", window=6)
  assert calls[-1][:2] == ("cudnn", (5, 0))
  np.testing.assert_array_equal(calls[-1][2], make_attention_mask(seg, True, window=6))
  attention(q, k, v, spec, "cudnn", window=6, local=False)
  assert calls[-1][:2] == ("cudnn", None)
  calls.clear()
  jax.jit(lambda local: attention(q, k, v, spec, "cudnn", window=6, local=local))(True)
  assert sorted(c[1] or () for c in calls) == [(), (5, 0)]
  with pytest.raises(ValueError, match="cannot soft-cap"):
    attention(q, k, v, spec, "cudnn", softcap=5.0)


def test_xla_with_softcap_and_window_equals_reference():
  from lmjax.model.masks import MaskSpec
  q, k, v, seg, _ = _inputs(2)
  spec = MaskSpec(seg, None, True)
  for local in (True, False, jnp.bool_(True)):
    got = attention(q, k, v, spec, "xla", window=7, local=local, scale=0.4, softcap=2.0)
    mask = make_attention_mask(seg, True, window=7 if local else None)
    want = attention(q, k, v, mask, "reference", scale=0.4, softcap=2.0)
    valid = np.asarray(seg != 0)
    np.testing.assert_allclose(np.asarray(got)[valid], np.asarray(want)[valid], atol=1e-6)
