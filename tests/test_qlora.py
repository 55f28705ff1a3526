"""QLoRA: the frozen base kept as per-channel int8 or NF4 (double-quantized), dequantized
inside each matmul; adapters train on it as on a float base."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hf_models import make_hf_model
from lmjax import lora
from lmjax.lora import quant
from lmjax.experiment import experiment_from_dict
from tiny import finetune, tiny_config


def test_int8_and_nf4_round_trips_are_close_and_nf4_codes_are_exact():
  rng = np.random.default_rng(0)
  w = rng.normal(size=(2, 64, 4, 32)).astype(np.float32)  # a stacked (L, in, heads, kv) kernel
  q = quant.quantize(w, 1, 1, "int8")
  assert q["kernel_q"].dtype == jnp.int8 and q["kernel_scale"].shape == (2, 1, 4, 32)
  back = np.asarray(jax.vmap(lambda n: quant.dequantize(n, jnp.float32))(q))
  assert np.all(np.abs(back - w) <= np.asarray(q["kernel_scale"]) / 2 + 1e-7)
  n = quant.quantize(w, 1, 1, "nf4")
  assert n["kernel_nf4"].dtype == jnp.uint8 and n["kernel_nf4"].size == w.size // 2
  back = np.asarray(jax.vmap(lambda n: quant.dequantize(n, jnp.float32))(n)).reshape(w.shape)
  assert np.mean(np.abs(back - w)) / np.mean(np.abs(w)) < 0.12  # 4 bits per weight
  blocks = w.reshape(2, -1, quant.BLOCK)
  absmax = np.abs(blocks).max(-1, keepdims=True)
  exact = (absmax * np.asarray(quant.NF4_CODE)[rng.integers(0, 16, blocks.shape)]).reshape(w.shape)
  got = np.asarray(jax.vmap(lambda n: quant.dequantize(n, jnp.float32))(
      quant.quantize(exact, 1, 1, "nf4"))).reshape(w.shape)
  np.testing.assert_allclose(got, exact, rtol=0.02, atol=1e-6)  # only the absmaxes round


@pytest.fixture(scope="module")
def base(tmp_path_factory):
  tmp = tmp_path_factory.mktemp("qlora")
  make_hf_model("llama", str(tmp / "llama"))
  return tmp


def _config(tmp, base_dtype):
  c = tiny_config("chat_tiny", tmp, train__steps=6, train__checkpoint_every=6, data__seq_len=64,
                  optimizer__learning_rate=0.01, optimizer__warmup_steps=0)
  c.lora.update(enabled=True, rank=4, alpha=8.0, targets=("all",), base_dtype=base_dtype)
  return c.to_dict()


def _trained(base, kind) -> dict:
  """The results of chat_tiny's 6 QLoRA steps on `kind`'s base in base/KIND, run once
  (both tests below use the nf4 run)."""
  import json
  results = base / kind / "results.json"
  if not results.exists():
    finetune(_config(base, kind), base / "llama", base / kind)
  return json.loads(results.read_text())


def test_qlora_keeps_the_base_quantized_and_trains_close_to_lora(base):
  from lmjax.loop import _fresh
  from lmjax.run import assemble
  from lmjax.sharding import logical_to_shardings
  from lmjax.steps import eval_step, init_state
  losses = {}
  for kind in ("float", "int8", "nf4"):
    config = _config(base, kind)
    losses[kind] = _trained(base, kind)["loss"]
    config["train"]["init_from"] = str(base / "llama")
    parts = assemble(experiment_from_dict(config), None)
    abstract = jax.eval_shape(lambda: init_state(parts.fns, 0, (1, 64)))
    with jax.set_mesh(parts.mesh):
      state = _fresh(parts, logical_to_shardings(abstract, parts.mesh, parts.exp.mesh.rules))
    kernels = [v for k, v in jax.tree_util.tree_leaves_with_path(state.params)
               if "kernel" in jax.tree_util.keystr(k) and "lm_head" not in jax.tree_util.keystr(k)]
    dtypes = {str(v.dtype) for v in kernels if v.ndim > 1 and v.size > 64}
    expected = {"float": {"float32"}, "int8": {"int8"}, "nf4": {"uint8", "int8"}}[kind]
    assert dtypes <= expected | {"float32"} and (kind == "float" or dtypes & expected), dtypes
    batch = jax.tree.map(jnp.asarray, parts.train_data.batch(0, 8, 0, 1))
    sums = eval_step(parts.fns, state.params, batch, jax.random.PRNGKey(0))
    losses[kind + "_step0"] = float(sums["loss"] / sums["weight"])
  for kind in ("int8", "nf4"):
    assert abs(losses[kind] - losses["float"]) / losses["float"] < 0.02, losses
    assert abs(losses[kind + "_step0"] - losses["float_step0"]) / losses["float_step0"] < 0.02


def test_a_qlora_run_loads_merged_into_the_base_it_trained_on(base):
  """Merging dequantizes the base as training saw it, so the merged model computes what
  the adapted quantized model computes."""
  from lmjax import pretrained
  from lmjax.checkpoint import Checkpointer
  from lmjax.model import build_model
  from lmjax.run import assemble
  _trained(base, "nf4")
  config = _config(base, "nf4")
  config["train"]["init_from"] = str(base / "llama")
  parts = assemble(experiment_from_dict(config), None)
  ckpt = Checkpointer(str(base / "nf4"), read_only=True)
  try:
    adapters = ckpt.restore_arrays(6)["params"]
  finally:
    ckpt.close()
  tokens = jnp.arange(3, 35)[None] % 200
  params = lora.combine(parts.init_params, adapters)  # the quantized base + trained adapters
  ours = parts.fns.eval_model.apply({"params": params}, tokens, jnp.ones_like(tokens))
  merged = pretrained.load(str(base / "nf4"))
  plain = build_model(merged.model, True).apply({"params": merged.params}, tokens,
                                                jnp.ones_like(tokens))
  np.testing.assert_allclose(np.asarray(plain), np.asarray(ours), atol=1e-4)
