"""The optimizer registry: AdamW unchanged, Muon, Adafactor, Lion, schedule-free AdamW, a
research optimizer from an experiment file; checkpoints and exact resume for each.
(Sharded updates equal unsharded ones: tests/multidevice/test_optimizers_sharded.py.)"""

import functools
import importlib
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from tiny import assert_same_checkpoint, tiny_config
from lmjax import objectives
from lmjax import train as train_lib
from lmjax.data.tokenizer import SpecialTokens
from lmjax.errors import UserError
from lmjax.checkpoint import Checkpointer
from lmjax.experiment import experiment_from_dict
from lmjax.loop import Hook
from lmjax.model import TransformerConfig
from lmjax.optim import (OptimizerConfig, build_optimizer, decay_mask, learning_rate_schedule,
                         state_bytes)
from lmjax.optim.muon import muon_dims, muon_specs
from lmjax.steps import param_axes

SPECIAL = SpecialTokens(pad=0, unk=1, bos=2, eos=3, mask=4, cls=5, sep=6)
KINDS = ("adamw", "muon", "adafactor", "lion", "schedule_free_adamw")


def _fns(kind="adamw", scan=False, **opt):
  cfg = TransformerConfig(family="decoder", vocab_size=64, max_len=16, d_model=32,
                          num_layers=2, num_heads=2, d_ff=64, scan_layers=scan)
  opt = OptimizerConfig(kind=kind, **{"learning_rate": 1e-2, "warmup_steps": 0, **opt})
  objective = objectives.build(objectives.objective_class("clm").config_class(kind="clm"),
                               SPECIAL, cfg.vocab_size)
  return train_lib.step_fns(cfg, objective, opt, 10)


def _batch(seed=2):
  tokens = jax.random.randint(jax.random.PRNGKey(seed), (8, 16), 7, 64)
  return {"tokens": tokens, "segment_ids": jnp.ones_like(tokens),
          "positions": jnp.broadcast_to(jnp.arange(16), (8, 16))}


def _init(fns):
  return jax.jit(lambda: train_lib.unbox(train_lib.init_state(fns, 0, (1, 16))))()


def _train(fns, state, steps=3, vary=True):
  step = jax.jit(functools.partial(train_lib.train_step, fns))
  losses = []
  for i in range(steps):
    state, metrics = step(state, _batch(i if vary else 0))
    losses.append(float(metrics["loss"]))
  return state, losses


def test_adamw_is_todays_optimizer_bit_for_bit():
  """optimizer.kind=adamw (the default) is the chain lmjax always built: same state tree
  (old checkpoints restore into it) and the same steps, bit for bit."""
  fns = _fns()
  opt = OptimizerConfig(learning_rate=1e-2, warmup_steps=0)
  old_tx = optax.chain(optax.clip_by_global_norm(opt.clip_grad_norm),
                       optax.adamw(learning_rate_schedule(opt, 10), b1=opt.b1, b2=opt.b2,
                                   eps=opt.eps, weight_decay=opt.weight_decay, mask=decay_mask))
  old = fns.__class__(**{**vars(fns), "tx": old_tx})
  a, b = _init(fns), _init(old)
  assert jax.tree.structure(a.opt_state) == jax.tree.structure(b.opt_state)
  (a, _), (b, _) = _train(fns, a), _train(old, b)
  jax.tree.map(np.testing.assert_array_equal, a, b)


# Muon and Adafactor treat a scanned (layers, ...) stack's matrices apart from unrolled
# ones: both layouts. AdamW, Lion and schedule-free AdamW update elementwise, the same on
# either layout: one each (scanned and unrolled models compute alike: test_model.py).
@pytest.mark.parametrize("kind,scan", [("muon", False), ("muon", True), ("adafactor", False),
                                       ("adafactor", True), ("adamw", False), ("lion", True),
                                       ("schedule_free_adamw", False)])
def test_every_optimizer_trains(kind, scan):
  lr = {"adafactor": 3e-2, "lion": 1e-3}.get(kind, 1e-2)
  fns = _fns(kind, scan, learning_rate=lr, adafactor_min_dim=16)
  _, losses = _train(fns, _init(fns), 12, vary=False)  # memorises one batch
  assert losses[-1] < losses[0] - 0.1, losses


def test_muon_matrix_axes_come_from_logical_names():
  assert muon_dims(("embed", "heads", "kv")) == ((0,), (1, 2))  # query: embed -> heads x kv
  assert muon_dims(("heads", "kv", "embed")) == ((0, 1), (2,))  # out: heads x kv -> embed
  assert muon_dims(("layers", "embed", "mlp")) == ((1,), (2,))  # a scanned stack's wi
  assert muon_dims(("layers", "mlp", "embed")) == ((1,), (2,))
  specs = muon_specs(param_axes(_fns(scan=True).eval_model))
  names = {"/".join(k[-3:]) for k in specs}
  assert names == {"attention/query/kernel", "attention/key/kernel", "attention/value/kernel",
                   "attention/out/kernel", "mlp/wi/kernel", "mlp/wo/kernel"}, names
  # embeddings, norms, biases (and an untied head) are AdamW's: not in the specs
  assert not any(k[-1] in ("embedding", "scale", "bias") for k in specs)


def _stack(unrolled):
  """An unrolled stack's layers_i parameters as one scanned `layers` stack."""
  stack = unrolled["transformer"]["stack"]
  layers = [stack[f"layers_{i}"] for i in range(len(stack))]
  out = dict(unrolled, transformer=dict(unrolled["transformer"]))
  out["transformer"]["stack"] = {"layers": jax.tree.map(lambda *x: jnp.stack(x), *layers)}
  return out


def test_muon_orthogonalises_each_layer_of_a_scanned_stack_on_its_own():
  """The same weights and gradients, unrolled and as a scanned (layers, ...) stack, get the
  same update: each layer's matrix is orthogonalised alone, not the 3-D array."""
  flat, scanned = _fns("muon"), _fns("muon", scan=True)
  params = _init(flat).params
  grads = jax.tree.map(lambda p: jax.random.normal(jax.random.PRNGKey(p.size), p.shape), params)
  u_flat, _ = flat.tx.update(grads, flat.tx.init(params), params)
  stacked = _stack(params)
  u_scan, _ = scanned.tx.update(_stack(grads), scanned.tx.init(stacked), stacked)
  jax.tree.map(functools.partial(np.testing.assert_allclose, atol=1e-6), _stack(u_flat), u_scan)
  # and the hidden matrices' updates are orthogonal up to Newton-Schulz's band (0.5-1.5)
  wi = -np.asarray(u_flat["transformer"]["stack"]["layers_0"]["mlp"]["wi"]["kernel"])
  scale = 1e-2 * 0.2 * np.sqrt(max(wi.shape))  # lr x rms_scale x sqrt(max fan)
  sv = np.linalg.svd(wi / scale, compute_uv=False)
  assert 0.4 < sv.min() and sv.max() < 1.6, sv


def test_muon_gives_the_other_parameters_adamw():
  adam, muon = _fns("adamw", clip_grad_norm=0.0), _fns("muon", clip_grad_norm=0.0)
  params = _init(muon).params
  grads = jax.tree.map(lambda p: jnp.full(p.shape, 0.01), params)
  u_muon, _ = muon.tx.update(grads, muon.tx.init(params), params)
  u_adam, _ = adam.tx.update(grads, adam.tx.init(params), params)
  for path in (("transformer", "embed", "tokens", "embedding"),
               ("transformer", "final_norm", "norm", "scale"),
               ("transformer", "stack", "layers_1", "mlp", "wo", "bias")):
    get = lambda t: functools.reduce(lambda d, k: d[k], path, t)
    np.testing.assert_array_equal(get(u_muon), get(u_adam))


def test_schedule_free_equals_optax_at_the_averaged_point():
  """lmjax's schedule-free AdamW keeps x (the averaged point) as the parameters and takes
  gradients at y; optax's keeps y and derives x. With a constant rate (where the two
  count steps alike) the x sequences are equal."""
  target = jnp.array([1.0, -2.0, 3.0, 0.5])
  loss = lambda p: jnp.sum((p["w"] - target) ** 2 * jnp.arange(1.0, 5.0))
  ours = build_optimizer(
      OptimizerConfig(kind="schedule_free_adamw", learning_rate=0.1, warmup_steps=0,
                      schedule="constant", weight_decay=0.0, clip_grad_norm=0.0, b2=0.999), 20)
  ref = optax.contrib.schedule_free_adamw(0.1, b1=0.9, b2=0.999, eps=1e-8)
  x = y = {"w": jnp.zeros(4)}
  s, r = ours.tx.init(x), ref.init(y)
  for _ in range(20):
    g = jax.grad(loss)(ours.gradient_point(x, s))
    u, s = ours.tx.update(g, s, x)
    x = optax.apply_updates(x, u)
    u, r = ref.update(jax.grad(loss)(y), r, y)
    y = optax.apply_updates(y, u)
  np.testing.assert_allclose(x["w"], optax.contrib.schedule_free_eval_params(r, y)["w"],
                             rtol=1e-5, atol=1e-6)


def test_schedule_free_train_step_takes_its_gradient_at_y():
  """The parameters are x; the step's loss is the loss at y = b1 x + (1 - b1) z."""
  fns = _fns("schedule_free_adamw")
  state, _ = _train(fns, _init(fns), 3)
  y = fns.gradient_point(state.params, state.opt_state)
  assert not all(np.allclose(a, b) for a, b in zip(jax.tree.leaves(y),
                                                   jax.tree.leaves(state.params)))
  batch = _batch(7)
  _, metrics = jax.jit(functools.partial(train_lib.train_step, fns))(state, batch)
  b = fns.objective.prepare(batch, jax.random.PRNGKey(0))
  sums = fns.objective.loss_sums(fns.model, y, b, {})
  np.testing.assert_allclose(metrics["loss"], sums["loss"] / sums["weight"], rtol=1e-5)


def test_state_memory_per_optimizer():
  sizes = {}
  for kind in KINDS:
    fns = _fns(kind, adafactor_min_dim=16)
    state = _init(fns)
    params = sum(x.size * 4 for x in jax.tree.leaves(state.params))
    sizes[kind] = state_bytes(state.opt_state)[0] / params
  assert 1.99 < sizes["adamw"] < 2.01  # two moments
  assert 1.99 < sizes["schedule_free_adamw"] < 2.01  # z and one moment
  assert 0.99 < sizes["lion"] < 1.01  # one moment
  assert 1.0 < sizes["muon"] < 2.0  # matrices: one moment; the rest: AdamW's two
  assert sizes["adafactor"] < 0.5  # row and column means for matrices


def _run(tmp, kind, **overrides):
  config = tiny_config("clm_tiny", tmp, optimizer__kind=kind, **overrides)
  if kind == "adafactor":
    config.optimizer.adafactor_min_dim = 16
  return experiment_from_dict(config.to_dict())


class StopAt(Hook):
  """Stops the loop after a step, as a preemption does: a checkpoint, then return."""

  def __init__(self, step):
    self.at = step

  def after_step(self, ctx, step, state, metrics):
    return "stopped" if step == self.at else None


@pytest.mark.parametrize("kind", KINDS[1:])
def test_checkpoints_and_exact_resume(tmp_path, kind):
  """Stopped at step 5 and resumed, a run ends bitwise where an uninterrupted one does
  (AdamW's own resume tests are in test_train.py)."""
  exp = _run(tmp_path, kind, train__steps=10, train__checkpoint_every=10)
  train_lib.train_and_evaluate(exp, str(tmp_path / "whole"))
  train_lib.train_and_evaluate(exp, str(tmp_path / "part"), hooks=[StopAt(5)])
  assert Checkpointer(str(tmp_path / "part"), read_only=True).all_steps() == [5]
  train_lib.train_and_evaluate(exp, str(tmp_path / "part"))
  assert_same_checkpoint(tmp_path / "whole", tmp_path / "part", 10)


def test_an_optimizer_registered_in_an_experiment_file(tmp_path, caplog):
  module = importlib.import_module("experiments.custom_optimizer")
  config = tiny_config("custom_optimizer", tmp_path, train__steps=20,
                       optimizer__learning_rate=3e-3)
  config.optimizer.signum_momentum = 0.8
  exp = experiment_from_dict(config.to_dict())
  assert isinstance(exp.optimizer, module.SignumConfig) and exp.optimizer.signum_momentum == 0.8
  with caplog.at_level("INFO"):
    train_lib.train_and_evaluate(exp, str(tmp_path / "run"))
  records = [json.loads(x) for x in open(tmp_path / "run" / "metrics.jsonl")]
  losses = [r["loss"] for r in records if r["split"] == "train"]
  assert losses[-1] < losses[0] - 0.3, losses
  # the state's memory is reported at the start: one moment, 4 bytes a parameter
  line = next(r.getMessage() for r in caplog.records if "optimizer signum: state" in
              r.getMessage())
  assert "(4.00 bytes per parameter)" in line, line
  # the research experiment with optimizer.kind=adamw: its own option at its default passes
  config.optimizer.kind, config.optimizer.signum_momentum = "adamw", 0.9
  assert experiment_from_dict(config.to_dict()).optimizer.kind == "adamw"
  config.optimizer.signum_momentum = 0.5  # ... but not set to something adamw would ignore
  with pytest.raises(UserError, match="optimizer.signum_momentum is not an option of "
                                      "optimizer.kind=adamw"):
    experiment_from_dict(config.to_dict())


def test_bad_optimizer_choices_are_one_line(tmp_path):
  config = tiny_config("clm_tiny", tmp_path)
  config.optimizer.kind = "sgdd"
  with pytest.raises(UserError, match="optimizer.kind must be one of adamw, adafactor, lion, muon, "):
    experiment_from_dict(config.to_dict())
  config.optimizer.kind, config.model.parametrization = "muon", "mup"
  config.model.mup_base_d_model = 16  # a µP model wider than its base
  with pytest.raises(UserError, match="optimizer.kind=muon has no µP rule"):
    train_lib.dry_run(experiment_from_dict(config.to_dict()), str(tmp_path / "run"))
