"""LoRA on a mesh: the adapters and a quantized base shard as their layers do and training
on 8 simulated devices equals one device (over an NF4 base)."""

import numpy as np
import pytest

from test_equivalence import _experiment, _losses


# data x fsdp x tensor over an NF4 base (its codes sharded, `test_a_quantized_base...`). The
# adapters shard the same over a float base; the float base's layers are those of every
# test_equivalence.py run, and LoRA over a float base equals its merged model on one device
# (tests/test_lora.py).
@pytest.fixture(scope="module")
def base(tmp_path_factory):
  """A two-step clm_tiny run the adapters start from."""
  tmp = tmp_path_factory.mktemp("base")
  _losses(_experiment(tmp, "clm_tiny", (1, 1, 1), train__steps=2), tmp / "base",
          pytest.MonkeyPatch(), one_device=True)
  return tmp / "base"


def test_lora_training_on_a_mesh_matches_one_device(tmp_path, monkeypatch, base):
  import dataclasses
  runs, base_dtype = {}, "nf4"
  for name, shape in (("one", (1, 1, 1)), ("mesh", (2, 2, 2))):
    exp = _experiment(tmp_path, "clm_tiny", shape, train__init_from=str(base))
    exp = dataclasses.replace(exp, lora=dataclasses.replace(
        exp.lora, enabled=True, rank=4, targets=("attention_mlp",), base_dtype=base_dtype))
    runs[name] = _losses(exp, tmp_path / name, monkeypatch, one_device=name == "one")
  assert len(runs["mesh"][0]) == 5
  np.testing.assert_allclose(runs["mesh"][0], runs["one"][0], rtol=2e-4, atol=2e-4)
  np.testing.assert_allclose(runs["mesh"][1], runs["one"][1], rtol=2e-4)


@pytest.mark.parametrize("base_dtype", ["int8", "nf4"])
def test_a_quantized_base_shards_as_its_float_layers(tmp_path, base_dtype):
  """QLoRA's frozen codes follow their layer's logical axes over (data, fsdp, tensor) =
  (2, 2, 2): int8 codes as the float kernel; NF4 codes along its first two axes (rows of
  whole blocks), so no device holds a whole quantized base."""
  import dataclasses
  import jax
  from lmjax import objectives, pretrained
  from lmjax.data.tokenizer import SpecialTokens
  from lmjax.sharding import logical_to_shardings, make_mesh
  from lmjax.steps import init_state, step_fns
  from test_equivalence import _experiment
  exp = _experiment(tmp_path, "clm_tiny", (2, 2, 2))
  special = SpecialTokens(pad=0, unk=1, bos=2, eos=3, mask=4, cls=5, sep=6)
  objective = objectives.build(exp.objective, special, exp.model.vocab_size)
  spec = lambda lora: jax.tree.map(
      lambda s: s.spec, logical_to_shardings(jax.eval_shape(lambda: init_state(step_fns(
          exp.model, objective, exp.optimizer, 2, 1, lora, 32), 0, (1, 32))).params,
          make_mesh(exp.mesh), exp.mesh.rules))
  flat = lambda tree: {pretrained.param_name(k): v
                       for k, v in jax.tree_util.tree_leaves_with_path(tree)}
  floats = flat(spec(dataclasses.replace(exp.lora, enabled=True, rank=4)))
  codes = flat(spec(dataclasses.replace(exp.lora, enabled=True, rank=4, base_dtype=base_dtype)))
  leaf = "kernel_q" if base_dtype == "int8" else "kernel_nf4"
  layers = [n.rsplit("/", 1)[0] for n in codes if n.endswith(leaf)]
  assert len(layers) == 12, layers  # query, key, value, out, wi, wo in each of 2 layers
  for layer in layers:
    kernel = tuple(floats[layer + "/kernel"])
    got = tuple(codes[f"{layer}/{leaf}"])
    assert got == kernel[:len(got)] and len(got) == (len(kernel) if leaf == "kernel_q" else 2)
    assert any(axis is not None for axis in got), layer  # not replicated
