"""A mixture of experts on 8 simulated devices equals one device: the expert mesh axis at 1, 2
and 8 with data and fsdp for dropless dispatch (tokens exchanged by all-to-all under
shard_map), at 4 for capacity dispatch (a sharding constraint XLA turns into all-to-all); the
experts' kernels are split over the expert axis (4 of them, `test_experts_are_split...`)."""

import json

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from tiny import tiny_config
from lmjax import run as run_lib
from lmjax import train as train_lib
from lmjax.checkpoint import Checkpointer
from lmjax.experiment import experiment_from_dict
from lmjax.sharding import make_mesh

STEPS = 4
WIDE = dict(model__d_model=64, model__num_heads=8, model__d_ff=128, model__moe__d_ff=64,
            train__batch_size=16, train__log_every=1, train__steps=STEPS,
            train__eval_every=STEPS, train__checkpoint_every=STEPS)


def _experiment(tmp_path, mesh, arg=None):
  config = tiny_config("moe_tiny", tmp_path, arg, **WIDE)
  config.mesh.data, config.mesh.fsdp, config.mesh.expert = mesh
  return experiment_from_dict(config.to_dict())


def _run(exp, workdir, one_device=False):
  """(train losses and grad norms, eval losses, final parameters) of a run."""
  mp = pytest.MonkeyPatch()
  if one_device:
    mp.setattr(run_lib, "make_mesh", lambda cfg, devices=None: make_mesh(cfg, jax.devices()[:1]))
  try:
    train_lib.train_and_evaluate(exp, str(workdir))
  finally:
    mp.undo()
  records = [json.loads(line) for line in open(workdir / "metrics.jsonl")]
  ckpt = Checkpointer(str(workdir), async_save=False)
  params = ckpt.restore_arrays(STEPS)["params"]
  ckpt.close()
  return (np.array([[r["loss"], r["grad_norm"], r["router_balance"]] for r in records
                    if r["split"] == "train"]),
          [r["loss"] for r in records if r["split"] == "eval"], params)


@pytest.fixture(scope="module")
def baselines(tmp_path_factory):
  out = {}
  for arg in (None, "capacity"):
    tmp = tmp_path_factory.mktemp(f"moe_{arg}")
    out[arg] = _run(_experiment(tmp, (1, 1, 1), arg), tmp / "run", one_device=True)
  return out


@pytest.mark.parametrize("arg,mesh", [
    (None, (2, 4, 1)), (None, (2, 2, 2)), (None, (1, 1, 8)), ("capacity", (2, 1, 4))])
def test_expert_parallel_training_matches_one_device(tmp_path, baselines, arg, mesh):
  train, evals, params = _run(_experiment(tmp_path, mesh, arg), tmp_path / "run")
  want_train, want_evals, want_params = baselines[arg]
  assert len(train) == STEPS
  np.testing.assert_allclose(train, want_train, rtol=2e-4, atol=2e-4)
  np.testing.assert_allclose(evals, want_evals, rtol=2e-4)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5),
               params, want_params)


def test_experts_are_split_over_the_expert_axis(tmp_path):
  from lmjax.data.tokenizer import SpecialTokens
  from lmjax import objectives
  import flax.linen as nn
  from lmjax.sharding import logical_to_shardings
  exp = _experiment(tmp_path, (1, 2, 4))
  objective = objectives.build(exp.objective, SpecialTokens(0, 1, 2, 3, 4, 5, 6),
                               exp.model.vocab_size)
  fns = train_lib.step_fns(exp.model, objective, exp.optimizer, 10)
  mesh = make_mesh(exp.mesh)
  with jax.set_mesh(mesh), nn.logical_axis_rules(exp.mesh.rules):
    abstract = jax.eval_shape(lambda: train_lib.init_state(fns, 0, (1, 32)))
    shardings = logical_to_shardings(abstract, mesh, exp.mesh.rules)
  experts = shardings.params["transformer"]["stack"]["layers_0"]["mlp"]["experts"]
  assert experts["wi"]["kernel"].spec == P("expert", "fsdp", "tensor")
  assert experts["wo"]["kernel"].spec == P("expert", "tensor", "fsdp")
  shape = abstract.params["transformer"]["stack"]["layers_0"]["mlp"]["experts"]["wi"]["kernel"]
  assert experts["wi"]["kernel"].shard_shape(getattr(shape, "value", shape).shape) == (8 // 4, 64 // 2, 64)
