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
