"""Every optimizer's update with the weights sharded (fsdp=4, and data x fsdp x tensor)
equals the unsharded update within 1e-5, scanned stacks included; the optimizer state is
sharded like the parameters where it has their shape."""

import functools

import flax.linen as nn
import jax
import numpy as np
import pytest

from lmjax import objectives
from lmjax import train as train_lib
from lmjax.data.tokenizer import SpecialTokens
from lmjax.model import TransformerConfig
from lmjax.optim import OptimizerConfig
from lmjax.sharding import DEFAULT_RULES, MeshConfig, batch_shardings, logical_to_shardings, \
    make_mesh, replicated

KINDS = ("adamw", "muon", "adafactor", "lion", "schedule_free_adamw")


def _fns(kind, scan):
  # LLaMA-style, without biases: a key bias's gradient is zero in exact arithmetic (softmax
  # ignores a constant per query), so Adam-type optimizers would normalise rounding noise
  # there, which differs with the sharding by design, not by a fault.
  cfg = TransformerConfig(family="decoder", vocab_size=128, max_len=32, d_model=64,
                          num_layers=2, num_heads=8, num_kv_heads=4, d_ff=128,
                          position="rope", norm="rmsnorm", mlp="swiglu", activation="silu",
                          use_bias=False, tie_embeddings=False, scan_layers=scan,
                          dtype="float32")
  opt = OptimizerConfig(kind=kind, learning_rate=1e-2, warmup_steps=0, adafactor_min_dim=32)
  objective = objectives.build(objectives.objective_class("clm").config_class(kind="clm"),
                               SpecialTokens(0, 1, 2, 3, 4, 5, 6), cfg.vocab_size)
  return train_lib.step_fns(cfg, objective, opt, 10)


def _batch(step):
  tokens = np.asarray(jax.random.randint(jax.random.PRNGKey(step), (16, 32), 7, 128), np.int32)
  return {"tokens": tokens, "segment_ids": np.ones_like(tokens),
          "positions": np.broadcast_to(np.arange(32, dtype=np.int32), tokens.shape).copy()}


def _step_fn(fns, mesh):
  """(the state's shardings, the jitted train step) on `mesh`."""
  with jax.set_mesh(mesh), nn.logical_axis_rules(DEFAULT_RULES):
    abstract = jax.eval_shape(lambda: train_lib.init_state(fns, 0, (1, 32)))
    shardings = logical_to_shardings(abstract, mesh, DEFAULT_RULES)
    batch_sh = batch_shardings(mesh, DEFAULT_RULES, _batch(0))
    step, _ = train_lib.jit_steps(fns, shardings, batch_sh, replicated(mesh))
  return shardings, lambda state, i: step(state, jax.device_put(_batch(i), batch_sh))


@functools.lru_cache(maxsize=None)
def _reference(kind, scan):
  """Two unsharded steps (moments, momentum, averages all under way), the state they
  leave on the host, and the third step's update from it."""
  fns = _fns(kind, scan)
  shardings, step = _step_fn(fns, make_mesh(MeshConfig(1, 1, 1), jax.devices()[:1]))
  state = jax.jit(lambda: train_lib.unbox(train_lib.init_state(fns, 0, (1, 32))),
                  out_shardings=shardings)()
  for i in range(2):
    state, _ = step(state, i)
  host = jax.device_get(state)
  after, _ = step(state, 2)
  return host, jax.tree.map(np.subtract, jax.device_get(after.params), host.params)


@functools.lru_cache(maxsize=None)
def _sharded_update(kind, scan, mesh_shape):
  """The third step's update from the same state, its weights sharded over `mesh_shape`."""
  host, _ = _reference(kind, scan)
  fns = _fns(kind, scan)
  mesh = make_mesh(MeshConfig(*mesh_shape), jax.devices()[:int(np.prod(mesh_shape))])
  shardings, step = _step_fn(fns, mesh)
  state = jax.device_put(host, shardings)
  after, _ = step(state, 2)
  return jax.tree.map(np.subtract, jax.device_get(after.params), host.params), state


@pytest.mark.parametrize("kind,mesh_shape,scan", [
    *[(kind, (1, 4, 1), True) for kind in KINDS],
    # data x fsdp x tensor for the two that reshape their state (Muon's matrices,
    # Adafactor's factored moments); an elementwise update (AdamW, Lion, schedule-free)
    # meets the mesh only through the gradient, which fsdp=4 checks already
    # (unrolled layers: Muon's per-layer matrices are the scanned stack's slices, and scanned
    # and unrolled Muon agree, test_optimizers.py)
    *[(kind, (2, 2, 2), True) for kind in ("muon", "adafactor")]])
def test_sharded_update_equals_unsharded(kind, mesh_shape, scan):
  update, state = _sharded_update(kind, scan, mesh_shape)
  jax.tree.map(functools.partial(np.testing.assert_allclose, atol=1e-5, rtol=0), update,
               _reference(kind, scan)[1])
  stack = state.params["transformer"]["stack"]["layers" if scan else "layers_0"]
  assert "fsdp" in stack["mlp"]["up"]["kernel"].sharding.spec  # the weights were sharded


def test_optimizer_state_is_sharded_like_the_parameters():
  spec = lambda x: tuple(x.sharding.spec)
  _, state = _sharded_update("muon", True, (1, 4, 1))
  muon, adam = state.opt_state[1].inner_states["muon"], state.opt_state[1].inner_states["adam"]
  mu = muon.inner_state[0].mu["transformer"]["stack"]["layers"]["mlp"]["up"]["kernel"]
  assert spec(mu)[:2] == (None, "fsdp")  # (layers, embed, mlp)
  nu = adam.inner_state[0].nu["transformer"]["embed"]["tokens"]["embedding"]
  assert spec(nu)[1] == "fsdp"  # (vocab, embed)
  _, state = _sharded_update("schedule_free_adamw", True, (1, 4, 1))
  z = state.opt_state[1].z["transformer"]["stack"]["layers"]["attention"]["out"]["kernel"]
  assert spec(z)[-1] == "fsdp"  # (layers, heads, kv, embed)
