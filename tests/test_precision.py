"""model.dtype=auto on a CPU: bfloat16 only where measured faster, and trainable there."""

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
  monkeypatch.setenv(precision.ENV, "fp8")
  with pytest.raises(UserError, match="LMJAX_CPU_DTYPE='fp8': expected float32 or bfloat16"):
    TransformerConfig().compute_dtype


def test_auto_follows_the_measurement_even_when_asked_inside_a_trace(monkeypatch):
  monkeypatch.delenv(precision.ENV, raising=False)
  precision.measure.cache_clear()
  seen = []
  jax.jit(lambda x: seen.append(TransformerConfig().compute_dtype) or x)(1.0)  # traced
  seconds = precision.measure()  # cached: the same figures the trace used
  assert seconds["float32"] > 0 and seconds["bfloat16"] > 0
  faster = seconds["float32"] >= precision.MARGIN * seconds["bfloat16"]
  assert seen == [jnp.dtype(jnp.bfloat16 if faster else jnp.float32)]
  precision.measure.cache_clear()


def _train_losses(tmp_path, name, **overrides):
  config = tiny_config("clm_tiny", tmp_path, train__steps=60, train__log_every=1,
                       train__checkpoint_every=60, **overrides)
  train_lib.train_and_evaluate(experiment_from_dict(config.to_dict()), str(tmp_path / name))
  rows = [json.loads(l) for l in open(tmp_path / name / "metrics.jsonl")]
  return np.array([r["loss"] for r in rows if r.get("split") == "train"])


def test_bfloat16_loss_curve_stays_within_seed_noise_of_float32(tmp_path):
  """The condition for `auto` to ever choose bfloat16 on a CPU: the tiny CLM learns the
  same in it. Noise = how far two float32 seeds (init and data order) end apart."""
  f32 = _train_losses(tmp_path, "f32", model__dtype="float32")
  other_seed = _train_losses(tmp_path, "seed", model__dtype="float32", train__seed=1)
  bf16 = _train_losses(tmp_path, "bf16", model__dtype="bfloat16")
  assert len(f32) == len(bf16) == 60 and f32[-1] < f32[0] - 1.0  # it learns
  tail = slice(-20, None)
  noise = abs(f32[tail].mean() - other_seed[tail].mean())
  assert abs(bf16[tail].mean() - f32[tail].mean()) <= max(2 * noise, 0.05), (
      bf16[tail].mean(), f32[tail].mean(), noise)
