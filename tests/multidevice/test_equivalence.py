"""Sharded training equals one device; parameters are sharded as the rules say; a
checkpoint restores onto another mesh."""

import dataclasses
import json

import flax.linen as nn
import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from tiny import tiny_config
from lmjax import run as run_lib
from lmjax import train as train_lib
from lmjax.checkpoint import Checkpointer
from lmjax.experiment import experiment_from_dict
from lmjax.sharding import MeshConfig, logical_to_shardings, make_mesh

WIDE = dict(model__d_model=64, model__num_heads=8, model__d_ff=128, train__batch_size=16,
            train__log_every=1, train__steps=5, train__eval_every=5)


def _experiment(tmp_path, name, mesh, **overrides):
  family = {"model__sliding_window": 8} if name == "gemma_tiny" else {}  # within the rows
  config = tiny_config(name, tmp_path, **{**WIDE, **family, **overrides})
  config.mesh.data, config.mesh.fsdp, config.mesh.tensor = mesh
  return experiment_from_dict(config.to_dict())


def _losses(exp, workdir, monkeypatch, one_device=False):
  if one_device:
    monkeypatch.setattr(run_lib, "make_mesh", lambda cfg, devices=None: make_mesh(
        cfg, jax.devices()[:1]))
  train_lib.train_and_evaluate(exp, str(workdir))
  monkeypatch.undo()
  records = [json.loads(line) for line in open(workdir / "metrics.jsonl")]
  return np.array([[r["loss"], r["grad_norm"]] for r in records if r["split"] == "train"]), \
      [r["loss"] for r in records if r["split"] == "eval"]


@pytest.fixture(scope="module")
def baselines(tmp_path_factory):
  mp = pytest.MonkeyPatch()
  out = {}
  for name in ("clm_tiny", "mlm_tiny", "qwen3_tiny", "gemma_tiny"):
    tmp = tmp_path_factory.mktemp(name)
    out[name] = _losses(_experiment(tmp, name, (1, 1, 1)), tmp / "run", mp, one_device=True)
  return out


# clm_tiny over fsdp=4 (2, 4, 1) and tensor=8 (1, 1, 8): the accumulation and the `xla`
# attention tests below run there
@pytest.mark.parametrize("name,mesh", [
    ("clm_tiny", (8, 1, 1)), ("mlm_tiny", (2, 2, 2)), ("qwen3_tiny", (2, 2, 2)),
    ("gemma_tiny", (2, 2, 2))])
def test_sharded_training_matches_one_device(tmp_path, monkeypatch, baselines, name, mesh):
  train, evals = _losses(_experiment(tmp_path, name, mesh), tmp_path / "run", monkeypatch)
  assert len(train) == 5
  np.testing.assert_allclose(train, baselines[name][0], rtol=2e-4, atol=2e-4)
  np.testing.assert_allclose(evals, baselines[name][1], rtol=2e-4)


def test_accumulation_and_remat_on_a_mesh_match_one_device(tmp_path, monkeypatch, baselines):
  # the objective only supplies the loss of each micro-batch (MLM's accumulation on one device:
  # tests/test_train.py)
  exp = _experiment(tmp_path, "clm_tiny", (2, 4, 1), train__grad_accum_steps=2,
                    model__remat_policy="full")
  train, _ = _losses(exp, tmp_path / "run", monkeypatch)
  np.testing.assert_allclose(train, baselines["clm_tiny"][0], rtol=2e-4, atol=2e-4)


@pytest.mark.parametrize("impl,mesh", [("splash", (2, 2, 2)), ("xla", (1, 1, 8))])
def test_attention_implementations_on_a_mesh_match_one_device(tmp_path, monkeypatch, baselines,
                                                              impl, mesh):
  """The baseline runs blockwise (`auto` on CPU). Splash runs in shard_map over the batch
  (data x fsdp) and head (tensor) axes, its kernel in Pallas interpret mode; `xla` one head
  per device."""
  exp = _experiment(tmp_path, "clm_tiny", mesh, model__attention_impl=impl)
  train, _ = _losses(exp, tmp_path / "run", monkeypatch)
  np.testing.assert_allclose(train, baselines["clm_tiny"][0], rtol=2e-4, atol=2e-4)


def _sharded_state(exp, mesh=None):
  from lmjax.data.tokenizer import SpecialTokens
  from lmjax import objectives
  objective = objectives.build(exp.objective, SpecialTokens(0, 1, 2, 3, 4, 5, 6),
                               exp.model.vocab_size)
  fns = train_lib.step_fns(exp.model, objective, exp.optimizer, 10)
  mesh = mesh or make_mesh(exp.mesh)
  with jax.set_mesh(mesh), nn.logical_axis_rules(exp.mesh.rules):
    abstract = jax.eval_shape(lambda: train_lib.init_state(fns, 0, (1, 32)))
    shardings = logical_to_shardings(abstract, mesh, exp.mesh.rules)
    state = jax.jit(lambda: train_lib.unbox(train_lib.init_state(fns, 0, (1, 32))),
                    out_shardings=shardings)()
  return state


def test_parameters_and_optimizer_state_are_sharded_by_the_rules(tmp_path):
  state = _sharded_state(_experiment(tmp_path, "clm_tiny", (2, 2, 2), model__scan_layers=True))
  layers = state.params["transformer"]["stack"]["layers"]
  spec = lambda x: x.sharding.spec
  assert spec(layers["attention"]["query"]["kernel"]) == P(None, "fsdp", "tensor", None)
  assert spec(layers["attention"]["out"]["kernel"]) == P(None, "tensor", None, "fsdp")
  assert spec(layers["mlp"]["wi"]["kernel"]) == P(None, "fsdp", "tensor")
  assert spec(state.params["transformer"]["embed"]["tokens"]["embedding"]) == P("tensor", "fsdp")
  adam = state.opt_state[1][0]  # chain(clip, adamw) -> adamw's ScaleByAdamState
  assert spec(adam.mu["transformer"]["stack"]["layers"]["mlp"]["wi"]["kernel"]) == \
      P(None, "fsdp", "tensor")
  kernel = layers["mlp"]["wi"]["kernel"]
  assert kernel.addressable_shards[0].data.shape == (2, 64 // 2, 128 // 2)


@pytest.fixture(scope="module")
def fsdp4_run(tmp_path_factory):
  """A 3-step clm_tiny run over fsdp=4 (4 of the 8 devices), its checkpoint to restore."""
  tmp = tmp_path_factory.mktemp("fsdp4")
  exp = _experiment(tmp, "clm_tiny", (1, 4, 1), train__steps=3, train__eval_every=0)
  mp = pytest.MonkeyPatch()
  mp.setattr(run_lib, "make_mesh", lambda cfg, devices=None: make_mesh(cfg, jax.devices()[:4]))
  try:
    train_lib.train_and_evaluate(exp, str(tmp / "run"))
  finally:
    mp.undo()
  return exp, tmp / "run"


@pytest.mark.parametrize("target", [(1, 1, 1), (2, 1, 2)])
def test_checkpoint_restores_onto_another_mesh(fsdp4_run, target):
  exp, workdir = fsdp4_run
  ckpt = Checkpointer(str(workdir))
  saved = ckpt.restore_arrays(3)
  new_exp = dataclasses.replace(exp, mesh=MeshConfig(*target))
  devices = jax.devices()[:int(np.prod(target))]
  mesh = make_mesh(new_exp.mesh, devices)
  state = _sharded_state(new_exp, mesh)
  abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding),
                          state)
  restored, meta = ckpt.restore(3, abstract)
  ckpt.close()
  assert meta["step"] == 3
  assert int(restored.step) == int(saved["step"]) == 3
  flat_saved = jax.tree.leaves(saved["params"])
  flat_restored = jax.tree.leaves(restored.params)
  assert len(flat_saved) == len(flat_restored)
  for a, b in zip(flat_saved, flat_restored):
    assert b.sharding.mesh.shape == mesh.shape
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
