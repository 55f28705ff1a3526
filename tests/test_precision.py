"""model.dtype=auto on a CPU: decided by the CPU's features (the same answer every time),
a timing only on request, and trainable in what it picks."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tiny import tiny_config
from lmjax import train as train_lib
from lmjax.errors import UserError
from lmjax.experiment import experiment_from_dict
from lmjax import cpu_dtype
from lmjax.model import TransformerConfig
from lmjax.model.precision import mixed_matmul


def test_pinned_dtype_and_a_bad_value(monkeypatch):
  monkeypatch.setenv(cpu_dtype.ENV, "bfloat16")
  assert TransformerConfig().compute_dtype == jnp.bfloat16
  monkeypatch.setenv(cpu_dtype.ENV, "float32")
  assert TransformerConfig().compute_dtype == jnp.float32
  assert TransformerConfig(dtype="bfloat16").compute_dtype == jnp.bfloat16  # explicit wins
  monkeypatch.setenv(cpu_dtype.ENV, "bfloat16_matmuls")  # float32 activations
  assert TransformerConfig().compute_dtype == jnp.float32
  assert TransformerConfig().matmul_dtype == jnp.bfloat16
  monkeypatch.setenv(cpu_dtype.ENV, "fp8")
  with pytest.raises(UserError, match="LMJAX_CPU_DTYPE='fp8': expected float32, bfloat16, "
                                      "bfloat16_matmuls, measure"):
    TransformerConfig().compute_dtype


def test_the_rule_reads_the_cpu_features(tmp_path, monkeypatch):
  assert cpu_dtype.rule(frozenset({"avx512f", "amx_tile", "amx_bf16"})) == "bfloat16_matmuls"
  assert cpu_dtype.rule(frozenset({"avx512f", "avx512_bf16"})) == "float32"  # no AMX
  assert cpu_dtype.rule(frozenset()) == "float32"
  x86, arm = tmp_path / "x86", tmp_path / "arm"
  x86.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx512f amx_bf16 amx_tile\n\n"
                 "processor\t: 1\nflags\t\t: fpu sse2 avx512f amx_bf16 amx_tile\n")
  arm.write_text("processor\t: 0\nFeatures\t: fp asimd bf16 i8mm\n")
  assert "amx_bf16" in cpu_dtype.cpu_flags(str(x86))
  assert cpu_dtype.rule(cpu_dtype.cpu_flags(str(arm))) == "float32"
  assert cpu_dtype.cpu_flags(str(tmp_path / "none")) == frozenset()  # macOS: no cpuinfo
  monkeypatch.delenv(cpu_dtype.ENV, raising=False)
  monkeypatch.setattr(cpu_dtype, "measure", lambda: pytest.fail("auto must not time anything"))
  monkeypatch.setattr(cpu_dtype, "cpu_flags", lambda: frozenset({"amx_bf16"}))
  assert TransformerConfig().resolved_dtype == "bfloat16_matmuls"
  monkeypatch.setattr(cpu_dtype, "cpu_flags", lambda: frozenset({"avx2"}))
  assert TransformerConfig().resolved_dtype == "float32"


def test_auto_is_one_answer_in_many_processes_on_a_loaded_machine():
  """The complaint: five processes, two numerics. Now several processes resolve `auto`
  while every core is busy, and all give the answer of the CPU's features."""
  env = {k: v for k, v in os.environ.items() if k != cpu_dtype.ENV}
  burn = [subprocess.Popen([sys.executable, "-c", "while True: pass"])
          for _ in range(os.cpu_count() or 2)]
  try:
    code = "from lmjax.model import TransformerConfig; print(TransformerConfig().resolved_dtype)"
    procs = [subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE,
                              text=True) for _ in range(4)]
    answers = {p.communicate(timeout=180)[0].strip() for p in procs}
  finally:
    for p in burn:
      p.kill()
      p.wait(timeout=30)
  assert answers == {cpu_dtype.rule(cpu_dtype.cpu_flags())}


def test_measure_is_an_opt_in_and_works_inside_a_trace(monkeypatch):
  monkeypatch.setenv(cpu_dtype.ENV, cpu_dtype.MEASURE)
  cpu_dtype.measure.cache_clear()
  seen = []
  jax.jit(lambda x: seen.append(TransformerConfig().compute_dtype) or x)(1.0)  # traced
  seconds = cpu_dtype.measure()  # cached: the same figures the trace used
  assert set(seconds) == set(cpu_dtype.CHOICES) and min(seconds.values()) > 0
  best = min(seconds, key=seconds.get)
  chosen = best if seconds["float32"] >= cpu_dtype.MARGIN * seconds[best] else "float32"
  assert cpu_dtype.cpu_auto_dtype() == chosen
  assert seen == [jnp.dtype(jnp.bfloat16 if chosen == "bfloat16" else jnp.float32)]
  cpu_dtype.measure.cache_clear()


def test_bfloat16_matmuls_round_only_the_operands():
  """Forward and dx: bfloat16 operands, float32 sums; dW: from the float32 values."""
  keys = jax.random.split(jax.random.PRNGKey(0), 3)
  x, w = jax.random.normal(keys[0], (64, 32)), jax.random.normal(keys[1], (32, 16))
  g = jax.random.normal(keys[2], (64, 16))
  bf = jnp.dtype(jnp.bfloat16)
  y, vjp = jax.vjp(lambda x, w: mixed_matmul(x, w, bf), x, w)
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
