import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lmjax.objectives import (MLMConfig, clm_targets, cross_entropy_sums,
                              fused_cross_entropy_sums, max_predictions, mlm_mask, token_metrics)

SPECIAL = (0, 1, 2, 3, 4, 5, 6)
MASK_ID, VOCAB = 4, 50


def test_clm_targets_stop_at_document_boundaries_and_padding():
  tokens = jnp.array([[10, 11, 12, 20, 21, 0, 0]])
  seg = jnp.array([[1, 1, 1, 2, 2, 0, 0]])
  targets, weights = clm_targets(tokens, seg)
  np.testing.assert_array_equal(weights[0], [1, 1, 0, 1, 0, 0, 0])
  np.testing.assert_array_equal(targets[0, [0, 1, 3]], [11, 12, 21])


def test_clm_loss_ignores_padding_and_cross_document_targets():
  tokens = jnp.array([[10, 11, 12, 20, 21, 0, 0]])
  seg = jnp.array([[1, 1, 1, 2, 2, 0, 0]])
  targets, weights = clm_targets(tokens, seg)
  logits = jax.random.normal(jax.random.PRNGKey(0), (1, 7, VOCAB))
  base = token_metrics(cross_entropy_sums(logits, targets, weights))
  # Changing logits where no target is counted changes nothing.
  noisy = logits.at[0, jnp.array([2, 4, 5, 6])].add(100.0)
  assert float(token_metrics(cross_entropy_sums(noisy, targets, weights))["loss"]) == float(base["loss"])
  assert float(base["tokens"]) == 3
  manual = -np.mean([jax.nn.log_softmax(logits[0, i])[t] for i, t in ((0, 11), (1, 12), (3, 21))])
  np.testing.assert_allclose(base["loss"], manual, rtol=1e-5)


def test_z_loss_and_label_smoothing_change_only_the_objective():
  logits = jax.random.normal(jax.random.PRNGKey(0), (2, 5, VOCAB)) * 3
  targets = jnp.ones((2, 5), jnp.int32) * 7
  w = jnp.ones((2, 5))
  plain = cross_entropy_sums(logits, targets, w)
  both = cross_entropy_sums(logits, targets, w, z_loss=1e-2, label_smoothing=0.1)
  assert float(plain["loss"]) == float(both["loss"])
  assert float(plain["objective"]) == float(plain["loss"])
  assert float(both["objective"]) != float(plain["objective"])


def test_mlm_masking_statistics():
  cfg = MLMConfig()
  rng = np.random.default_rng(0)
  tokens = rng.integers(0, VOCAB, size=(64, 128)).astype(np.int32)
  tokens[:, 0], tokens[:, -1] = 5, 6  # [CLS] ... [SEP]
  seg = np.ones_like(tokens)
  seg[:, 100:] = 0  # padding tail
  tokens[:, 100:] = 0
  tokens, seg = jnp.asarray(tokens), jnp.asarray(seg)
  special = np.isin(np.asarray(tokens), SPECIAL) | (np.asarray(seg) == 0)
  draw = jax.jit(lambda key: mlm_mask(key, tokens, seg, cfg, MASK_ID, SPECIAL, VOCAB))
  k = max_predictions(128, 0.15)
  selected = masked = randomized = kept = 0
  for i in range(20):
    inputs, positions, targets, weights = map(np.asarray, draw(jax.random.PRNGKey(i)))
    assert positions.shape == targets.shape == weights.shape == (64, k)
    rows = np.arange(64)[:, None]
    np.testing.assert_array_equal(targets, np.asarray(tokens)[rows, positions])
    sel = np.zeros(special.shape, bool)
    sel[rows, positions] = weights > 0
    assert (sel.sum(1) == weights.sum(1)).all(), "a position was selected twice"
    # BERT's exact count: round(15% of the ordinary tokens) in every row.
    np.testing.assert_array_equal(sel.sum(1), np.round(0.15 * (~special).sum(1)))
    assert not (sel & special).any(), "special tokens or padding were selected"
    selected += sel.sum()
    masked += (sel & (inputs == MASK_ID)).sum()
    kept += (sel & (inputs == np.asarray(tokens))).sum()
    randomized += (sel & (inputs != MASK_ID) & (inputs != np.asarray(tokens))).sum()
    assert not np.isin(inputs[sel & (inputs != MASK_ID)], SPECIAL).any()
    np.testing.assert_array_equal(inputs[~sel], np.asarray(tokens)[~sel])
  np.testing.assert_allclose(masked / selected, 0.8, atol=0.02)
  # A random replacement equals the original 1/(V - specials) of the time: counted as kept.
  p_same = 1 / (VOCAB - len(SPECIAL))
  np.testing.assert_allclose(randomized / selected, 0.1 * (1 - p_same), atol=0.015)
  np.testing.assert_allclose(kept / selected, 0.1 + 0.1 * p_same, atol=0.015)


def test_mlm_selection_is_uniform_over_ordinary_tokens():
  cfg = MLMConfig()
  tokens = jnp.arange(10, 50).reshape(1, 40).at[0, 5].set(5)  # one special token
  seg = jnp.ones_like(tokens)
  draw = jax.jit(jax.vmap(lambda key: mlm_mask(key, tokens, seg, cfg, MASK_ID, SPECIAL,
                                                VOCAB)[1:4:2]))
  positions, weights = draw(jax.random.split(jax.random.PRNGKey(0), 4000))
  counts = np.bincount(np.asarray(positions)[np.asarray(weights) > 0], minlength=40)
  assert counts[5] == 0
  share = np.delete(counts, 5) / counts.sum()  # 39 ordinary tokens, 6 chosen per draw
  np.testing.assert_allclose(share, 1 / 39, rtol=0.15)


def test_mlm_mask_depends_only_on_the_key():
  cfg = MLMConfig()
  tokens = jnp.arange(7, 47).reshape(2, 20)
  seg = jnp.ones_like(tokens)
  a = mlm_mask(jax.random.PRNGKey(3), tokens, seg, cfg, MASK_ID, SPECIAL, VOCAB)
  b = mlm_mask(jax.random.PRNGKey(3), tokens, seg, cfg, MASK_ID, SPECIAL, VOCAB)
  c = mlm_mask(jax.random.PRNGKey(4), tokens, seg, cfg, MASK_ID, SPECIAL, VOCAB)
  jax.tree.map(np.testing.assert_array_equal, a, b)
  assert not np.array_equal(a[1], c[1])


@pytest.mark.parametrize("vocab_first,with_bias,z_loss,smoothing", [
    (True, False, 0.0, 0.0), (False, True, 1e-2, 0.1), (True, True, 0.0, 0.2),
    (False, False, 1e-3, 0.0)])
def test_fused_head_equals_logits_then_cross_entropy(vocab_first, with_bias, z_loss, smoothing):
  b, length, d = 4, 12, 16
  keys = jax.random.split(jax.random.PRNGKey(1), 5)
  h = jax.random.normal(keys[0], (b, length, d))
  w = jax.random.normal(keys[1], (VOCAB, d) if vocab_first else (d, VOCAB)) * 0.3
  bias = jax.random.normal(keys[2], (VOCAB,)) if with_bias else None
  targets = jax.random.randint(keys[3], (b, length), 0, VOCAB)
  weights = (jax.random.uniform(keys[4], (b, length)) > 0.3).astype(jnp.float32)

  def plain(h, w, bias):
    logits = jnp.einsum("bld,vd->blv" if vocab_first else "bld,dv->blv", h, w)
    logits = logits if bias is None else logits + bias
    sums = cross_entropy_sums(logits, targets, weights, z_loss, smoothing)
    return sums["objective"], sums

  def fused(h, w, bias):  # 4 positions x 4 rows per chunk: 3 chunks
    sums = fused_cross_entropy_sums(h, w, bias, targets, weights, vocab_first, z_loss,
                                    smoothing, chunk_elements=16 * VOCAB)
    return sums["objective"], sums

  argnums = (0, 1, 2) if with_bias else (0, 1)
  want_grads, want = jax.grad(plain, argnums, has_aux=True)(h, w, bias)
  grads, got = jax.jit(jax.grad(fused, argnums, has_aux=True))(h, w, bias)
  evaluated = jax.jit(lambda: fused(h, w, bias)[1])()  # no gradient: the plain scan
  for key in ("loss", "objective", "correct", "weight"):
    np.testing.assert_allclose(got[key], want[key], rtol=1e-5)
    np.testing.assert_allclose(evaluated[key], want[key], rtol=1e-5)
  for a, e in zip(grads, want_grads):
    np.testing.assert_allclose(a, e, rtol=1e-4, atol=1e-6)


def test_fused_head_never_builds_the_logits():
  n, d, vocab = 4096, 64, 8192  # logits: 128 MiB in float32
  h = jnp.zeros((8, n // 8, d))
  w = jnp.zeros((vocab, d))
  targets, weights = jnp.zeros((8, n // 8), jnp.int32), jnp.ones((8, n // 8))
  logits_bytes = n * vocab * 4

  def temp_bytes(loss):
    compiled = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(h, w).compile()
    return compiled.memory_analysis().temp_size_in_bytes

  plain = temp_bytes(lambda h, w: cross_entropy_sums(
      jnp.einsum("bld,vd->blv", h, w), targets, weights)["objective"])
  fused = temp_bytes(lambda h, w: fused_cross_entropy_sums(
      h, w, None, targets, weights, True)["objective"])
  assert plain >= logits_bytes and fused < logits_bytes / 8, (plain, fused)
