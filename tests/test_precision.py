"""model.dtype=auto on a CPU: a bfloat16 mode only where measured faster, and trainable there."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tiny import tiny_config
from lmjax import train as train_lib
from lmjax.errors import UserError
from lmjax.experiment import experiment_from_dict
from lmjax.model import TransformerConfig, precision


def test_pinned_dtype_and_a_bad_value(monkeypatch):
  monkeypatch.setenv(precision.ENV, "bfloat16")
  assert TransformerConfig().compute_dtype == jnp.bfloat16
  monkeypatch.setenv(precision.ENV, "float32")
  assert TransformerConfig().compute_dtype == jnp.float32
  assert TransformerConfig(dtype="bfloat16").compute_dtype == jnp.bfloat16  # explicit wins
  monkeypatch.setenv(precision.ENV, "bfloat16_matmuls")  # float32 activations
  assert TransformerConfig().compute_dtype == jnp.float32
  assert TransformerConfig().matmul_dtype == jnp.bfloat16
  monkeypatch.setenv(precision.ENV, "fp8")
  with pytest.raises(UserError, match="LMJAX_CPU_DTYPE='fp8': expected float32, bfloat16, "
                                      "bfloat16_matmuls"):
    TransformerConfig().compute_dtype


def test_auto_follows_the_measurement_even_when_asked_inside_a_trace(monkeypatch):
  monkeypatch.delenv(precision.ENV, raising=False)
  precision.measure.cache_clear()
  seen = []
  jax.jit(lambda x: seen.append(TransformerConfig().compute_dtype) or x)(1.0)  # traced
  seconds = precision.measure()  # cached: the same figures the trace used
  assert set(seconds) == set(precision.CHOICES) and min(seconds.values()) > 0
  best = min(seconds, key=seconds.get)
  chosen = best if seconds["float32"] >= precision.MARGIN * seconds[best] else "float32"
  assert precision.cpu_auto_dtype() == chosen
  assert seen == [jnp.dtype(jnp.bfloat16 if chosen == "bfloat16" else jnp.float32)]
  precision.measure.cache_clear()


def test_bfloat16_matmuls_round_only_the_operands():
  """Forward and dx: bfloat16 operands, float32 sums; dW: from the float32 values."""
  keys = jax.random.split(jax.random.PRNGKey(0), 3)
  x, w = jax.random.normal(keys[0], (64, 32)), jax.random.normal(keys[1], (32, 16))
  g = jax.random.normal(keys[2], (64, 16))
  bf = jnp.dtype(jnp.bfloat16)
  y, vjp = jax.vjp(lambda x, w: precision.mixed_matmul(x, w, bf), x, w)
  dx, dw = vjp(g)
  rounded = lambda a: a.astype(bf).astype(jnp.float32)
  np.testing.assert_allclose(y, rounded(x) @ rounded(w), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(dx, rounded(g) @ rounded(w).T, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(dw, x.T @ g, rtol=1e-5, atol=1e-5)
  assert y.dtype == dx.dtype == dw.dtype == jnp.float32
  assert float(jnp.max(jnp.abs(y - x @ w))) > 1e-3  # the operands were rounded


def _train_losses(tmp_path, name, **overrides):
  config = tiny_config("clm_tiny", tmp_path, train__steps=60, train__log_every=1,
                       train__checkpoint_every=60, **overrides)
  train_lib.train_and_evaluate(experiment_from_dict(config.to_dict()), str(tmp_path / name))
  rows = [json.loads(l) for l in open(tmp_path / name / "metrics.jsonl")]
  return np.array([r["loss"] for r in rows if r.get("split") == "train"])


def test_bfloat16_loss_curves_stay_within_seed_noise_of_float32(tmp_path):
  """The condition for `auto` to ever choose a bfloat16 mode on a CPU: the tiny CLM
  learns the same in it. Noise = how far two float32 seeds (init and data order) end apart."""
  f32 = _train_losses(tmp_path, "f32", model__dtype="float32")
  other_seed = _train_losses(tmp_path, "seed", model__dtype="float32", train__seed=1)
  assert len(f32) == 60 and f32[-1] < f32[0] - 1.0  # it learns
  tail = slice(-20, None)
  noise = abs(f32[tail].mean() - other_seed[tail].mean())
  for dtype in ("bfloat16", "bfloat16_matmuls"):
    losses = _train_losses(tmp_path, dtype, model__dtype=dtype)
    assert len(losses) == 60
    assert abs(losses[tail].mean() - f32[tail].mean()) <= max(2 * noise, 0.05), (
        dtype, losses[tail].mean(), f32[tail].mean(), noise)
