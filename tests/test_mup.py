"""µP (model.parametrization=mup): equal to SP at the base width, stable activations as
the width grows (the coordinate check of Tensor Programs V) where SP's drift, and one-line
errors for widths that are not multiples of the base."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from lmjax.model import TransformerConfig, build_model
from lmjax.optim import OptimizerConfig, make_optimizer
from lmjax.sharding import unbox

BASE = 64


def _config(width: int, parametrization: str, **changes) -> TransformerConfig:
  fields = dict(vocab_size=256, max_len=32, d_model=width, num_layers=2, num_heads=4,
                d_ff=4 * width, parametrization=parametrization, mup_base_d_model=BASE,
                dtype="float32", scan_layers=False, attention_impl="reference")
  return TransformerConfig(**{**fields, **changes})


def _tokens() -> jnp.ndarray:
  rng = np.random.default_rng(0)  # synthetic: a repeated pattern the model can learn
  rows = [np.roll(np.arange(32) * 7 % 256, k) for k in rng.integers(0, 32, 8)]
  return jnp.asarray(np.stack(rows), jnp.int32)


_TRAINED: dict = {}


def _train(cfg: TransformerConfig, steps: int, lr: float):
  """(params after `steps` Adam steps at `lr` on a fixed batch, the first step's updates);
  each (config, steps, rate) is trained once per module, shared by the tests."""
  key = (repr(cfg), steps, lr)
  if key not in _TRAINED:
    _TRAINED[key] = _train_once(cfg, steps, lr)
  return _TRAINED[key]


def _train_once(cfg: TransformerConfig, steps: int, lr: float):
  model, tokens = build_model(cfg), _tokens()
  params = unbox(model.init(jax.random.PRNGKey(0), tokens)["params"])
  opt = make_optimizer(OptimizerConfig(learning_rate=lr, warmup_steps=0, schedule="constant",
                                       weight_decay=0.0, clip_grad_norm=0.0), steps,
                       cfg.width_mult)
  state = opt.init(params)

  def loss(p):
    logits = model.apply({"params": p}, tokens)[:, :-1]
    return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()

  @jax.jit
  def step(p, s):
    updates, s = opt.update(jax.grad(loss)(p), s, p)
    return optax.apply_updates(p, updates), s, updates
  first = None
  for _ in range(steps):
    params, state, updates = step(params, state)
    first = updates if first is None else first
  return model, params, first


def _coordinates(model, params) -> dict[str, float]:
  """RMS of the embedding output, every block's output and the logits."""
  logits, state = model.apply({"params": params}, _tokens(), capture_intermediates=True)
  inter = state["intermediates"]["transformer"]
  found = {"logits": logits, "embed": inter["embed"]["__call__"][0]}
  for name, sub in inter["stack"].items():
    if name.startswith("layers_"):
      found[name] = sub["__call__"][0][0]  # a block returns (x, aux)
  return {k: float(jnp.sqrt(jnp.mean(jnp.square(v)))) for k, v in found.items()}


def test_mup_at_the_base_width_is_sp():
  # 4 steps: the coordinate check's own base-width runs, trained once for both tests
  _, sp, sp_updates = _train(_config(BASE, "sp"), 4, 1e-2)
  _, mup, mup_updates = _train(_config(BASE, "mup"), 4, 1e-2)
  for a, b in zip(jax.tree.leaves((sp, sp_updates)), jax.tree.leaves((mup, mup_updates))):
    np.testing.assert_array_equal(a, b)


def test_coordinate_check_mup_stays_put_while_sp_drifts():
  # The base and 8x it: the spread is max/min over widths, and the drift grows with the
  # width, so the ends carry it (a 1024-wide model cost most of this file's time).
  widths = [64, 512]
  spread = {}
  for param in ("sp", "mup"):
    coords = [_coordinates(*_train(_config(w, param), 4, 1e-2)[:2]) for w in widths]
    spread[param] = {k: max(c[k] for c in coords) / min(c[k] for c in coords)
                     for k in coords[0]}
  # measured at 64..512: µP at most 1.3x, SP 67x on the blocks (64..1024: 2.4x, 117-135x)
  assert max(spread["mup"].values()) < 3.0, spread["mup"]
  assert min(spread["sp"][k] for k in ("layers_0", "layers_1")) > 20, spread["sp"]


def test_mup_scales_init_learning_rates_and_logits():
  cfg = _config(256, "mup")
  assert cfg.width_mult == 4.0 and cfg.query_mult == 0.5
  params = unbox(build_model(cfg).init(jax.random.PRNGKey(0), _tokens())["params"])
  block = params["transformer"]["stack"]["layers_0"]
  assert np.std(block["attention"]["query"]["kernel"]) == pytest.approx(0.01, rel=0.05)
  assert np.std(params["transformer"]["embed"]["tokens"]["embedding"]) == pytest.approx(
      0.02, rel=0.05)
  assert _config(256, "mup", head_dim=16, num_heads=16).query_mult == 1.0  # heads multiply
  # Adam's step: a hidden kernel moves 1/4 as far as at the base width, the embedding as far
  _, _, updates = _train(cfg, 1, 1e-2)
  _, _, base = _train(_config(BASE, "mup"), 4, 1e-2)  # its first step: the shared run's
  step = lambda u, *path: float(np.abs(_at(u, path)).max())  # Adam's first step: +-lr
  assert step(updates, "stack", "layers_0", "mlp", "wi", "kernel") == pytest.approx(
      step(base, "stack", "layers_0", "mlp", "wi", "kernel") / 4, rel=1e-3)
  assert step(updates, "embed", "tokens", "embedding") == pytest.approx(
      step(base, "embed", "tokens", "embedding"), rel=1e-3)


def _at(tree, path):
  node = tree["transformer"]
  for key in path:
    node = node[key]
  return node


def test_mup_widths_must_be_multiples_of_the_base():
  with pytest.raises(ValueError, match="d_model=96 is not a multiple of model.mup_base_d_model=64"):
    _config(96, "mup")
