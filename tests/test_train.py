import dataclasses
import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tiny import tiny_config
from lmjax import objectives
from lmjax import train as train_lib
from lmjax.checkpoint import Checkpointer
from lmjax.data import batches
from lmjax.data.tokenizer import SpecialTokens
from lmjax.errors import UserError
from lmjax.experiment import experiment_from_dict
from lmjax.model import TransformerConfig, build_model
from lmjax.optim import OptimizerConfig, decay_mask, learning_rate_schedule

SPECIAL = SpecialTokens(pad=0, unk=1, bos=2, eos=3, mask=4, cls=5, sep=6)


def _fns(kind, accum, dropout=0.0):
  cfg = TransformerConfig(family="decoder" if kind == "clm" else "encoder", vocab_size=64,
                          max_len=16, d_model=16, num_layers=2, num_heads=2, d_ff=32,
                          dropout_rate=dropout)
  opt = OptimizerConfig(learning_rate=1e-2, warmup_steps=0)
  objective = objectives.build(objectives.objective_class(kind).config_class(kind=kind), SPECIAL,
                               cfg.vocab_size)
  return train_lib.step_fns(cfg, objective, opt, 10, accum)


def _batch():
  tokens = jax.random.randint(jax.random.PRNGKey(2), (8, 16), 7, 64)
  segments = jnp.where(jnp.arange(16) < 12, 1, 2) * jnp.ones((8, 1), jnp.int32)
  segments = segments.at[:2, 14:].set(0)  # some padding
  positions = jnp.where(jnp.arange(16) < 12, jnp.arange(16), jnp.arange(16) - 12)
  return {"tokens": tokens, "segment_ids": segments,
          "positions": jnp.broadcast_to(positions, (8, 16))}


def _init(fns):
  return jax.jit(lambda: train_lib.unbox(train_lib.init_state(fns, 0, (1, 16))))()


@pytest.mark.parametrize("kind", ["clm", "mlm"])
def test_gradient_accumulation_equals_one_big_batch(kind):
  states = []
  for accum in (1, 4):
    fns = _fns(kind, accum)
    state = _init(fns)
    step = jax.jit(functools.partial(train_lib.train_step, fns))
    for _ in range(2):
      state, metrics = step(state, _batch())
    states.append((state, metrics))
  (a, ma), (b, mb) = states
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, atol=3e-5, rtol=1e-4),
               a.params, b.params)
  for key in ("loss", "accuracy", "grad_norm", "tokens"):
    np.testing.assert_allclose(ma[key], mb[key], rtol=1e-5)


def test_train_step_lowers_the_loss_and_counts_steps():
  fns = _fns("clm", 1, dropout=0.1)
  state = _init(fns)
  step = jax.jit(functools.partial(train_lib.train_step, fns))
  losses = []
  for _ in range(10):
    state, metrics = step(state, _batch())
    losses.append(float(metrics["loss"]))
  assert int(state.step) == 10 and losses[-1] < losses[0] - 0.5


def test_weight_decay_skips_norms_and_biases():
  fns = _fns("clm", 1)
  params = _init(fns).params
  mask = decay_mask(params)
  layer = mask["transformer"]["stack"]["layers"]
  assert layer["attention"]["query"]["kernel"] and layer["mlp"]["wi"]["kernel"]
  assert not layer["attention"]["query"]["bias"] and not layer["attention_norm"]["norm"]["scale"]
  assert mask["transformer"]["embed"]["tokens"]["embedding"]


def test_learning_rate_schedule_warms_up_then_decays():
  cfg = OptimizerConfig(learning_rate=1.0, warmup_steps=10, schedule="cosine", end_lr_ratio=0.1)
  lr = learning_rate_schedule(cfg, 110)
  assert float(lr(0)) == 0.0 and float(lr(5)) == pytest.approx(0.5)
  assert float(lr(10)) == pytest.approx(1.0) and float(lr(110)) == pytest.approx(0.1)
  linear = learning_rate_schedule(cfg.replace(schedule="linear") if hasattr(cfg, "replace")
                                  else OptimizerConfig(1.0, 10, "linear", 0.1), 110)
  assert float(linear(60)) == pytest.approx(0.55)


def _final_state(workdir, step):
  ckpt = Checkpointer(str(workdir), async_save=False)
  try:
    return ckpt.restore_arrays(step)
  finally:
    ckpt.close()


@pytest.mark.parametrize("name", ["clm_tiny", "mlm_tiny", "qwen3_tiny", "gemma_tiny"])
def test_interrupted_run_resumes_to_identical_parameters(tmp_path, monkeypatch, name):
  family = {"model__sliding_window": 8} if name == "gemma_tiny" else {}  # within the rows
  config = tiny_config(name, tmp_path, train__steps=12, train__checkpoint_every=4,
                       train__eval_every=6, **family)
  exp = experiment_from_dict(config.to_dict())
  straight = train_lib.train_and_evaluate(exp, str(tmp_path / "straight"))

  original = batches.PackedDataset.batch

  def crash_at_step_9(self, step, *args, **kwargs):
    if step == 9:
      raise RuntimeError("simulated crash")
    return original(self, step, *args, **kwargs)

  monkeypatch.setattr(batches.PackedDataset, "batch", crash_at_step_9)
  with pytest.raises(RuntimeError, match="simulated crash"):
    train_lib.train_and_evaluate(exp, str(tmp_path / "resumed"))
  monkeypatch.setattr(batches.PackedDataset, "batch", original)
  ckpt = Checkpointer(str(tmp_path / "resumed"))
  assert ckpt.latest_step() == 8  # the crash lost only the steps after the checkpoint
  ckpt.close()
  resumed = train_lib.train_and_evaluate(exp, str(tmp_path / "resumed"))
  assert resumed == straight
  a, b = _final_state(tmp_path / "straight", 12), _final_state(tmp_path / "resumed", 12)
  assert jax.tree.structure(a) == jax.tree.structure(b)
  jax.tree.map(np.testing.assert_array_equal, a, b)  # bitwise equal, optimizer state too
  lines = open(tmp_path / "resumed" / "metrics.jsonl").read().splitlines()
  assert any('"split": "eval"' in line for line in lines)


def test_larger_step_count_continues_a_finished_run(tmp_path):
  config = tiny_config("clm_tiny", tmp_path, train__steps=6)
  workdir = str(tmp_path / "run")
  train_lib.train_and_evaluate(experiment_from_dict(config.to_dict()), workdir)
  config.train.steps = 10
  train_lib.train_and_evaluate(experiment_from_dict(config.to_dict()), workdir)
  ckpt = Checkpointer(workdir)
  assert ckpt.latest_step() == 10
  ckpt.close()
  steps = [int(line.split('"step": ')[1].split(",")[0])
           for line in open(os.path.join(workdir, "metrics.jsonl")) if '"train"' in line]
  assert steps == [5, 6, 10]


def test_non_finite_step_leaves_parameters_and_optimizer_state_unchanged():
  fns = _fns("clm", 1)
  state = _init(fns)
  step = jax.jit(functools.partial(train_lib.train_step, fns))
  state, _ = step(state, _batch())
  poisoned = state.replace(params=jax.tree.map(lambda x: x, state.params))
  emb = poisoned.params["transformer"]["embed"]["tokens"]["embedding"]
  poisoned.params["transformer"]["embed"]["tokens"]["embedding"] = emb.at[7].set(jnp.nan)
  after, metrics = step(poisoned, _batch())
  assert float(metrics["skipped"]) == 1.0 and int(after.step) == int(poisoned.step) + 1
  jax.tree.map(np.testing.assert_array_equal, after.params, poisoned.params)
  jax.tree.map(np.testing.assert_array_equal, after.opt_state, poisoned.opt_state)
  _, ok = step(state, _batch())
  assert float(ok["skipped"]) == 0.0


def test_run_stops_after_consecutive_non_finite_steps(tmp_path):
  config = tiny_config("clm_tiny", tmp_path, train__steps=40, train__checkpoint_every=2,
                       train__max_consecutive_skips=3, train__log_every=1,
                       optimizer__learning_rate=1e30, optimizer__warmup_steps=0,
                       optimizer__clip_grad_norm=0.0)
  workdir = tmp_path / "run"
  with pytest.raises(UserError, match=r"3 consecutive steps had a non-finite loss .*step \d+"):
    train_lib.train_and_evaluate(experiment_from_dict(config.to_dict()), str(workdir))
  ckpt = Checkpointer(str(workdir))
  saved = ckpt.restore_arrays(ckpt.latest_step())
  ckpt.close()
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(saved["params"]))


# Each objective with a tied and an untied head, one of them soft-capped; tied and untied
# heads each with and without the cap (the pairs of the full 2 x 2 x 2 grid).
@pytest.mark.parametrize("kind,tied,cap", [("clm", True, 2.0), ("clm", False, 0.0),
                                           ("mlm", True, 0.0), ("mlm", False, 2.0)])
def test_fused_head_trains_as_the_logits_path(kind, tied, cap):
  """objective.fused_head=on and off take the same steps: same metrics and parameters
  (with Gemma's final soft-capping too: the fused loss caps its chunks' logits)."""
  runs = []
  for mode in ("off", "on"):
    fns = _fns(kind, 1)
    cfg = fns.model.cfg.replace(tie_embeddings=tied, use_bias=not tied, final_softcap=cap)
    options = objectives.objective_class(kind).config_class(kind=kind, fused_head=mode,
                                                            z_loss=1e-3)
    fns = dataclasses.replace(fns, model=build_model(cfg), eval_model=build_model(cfg),
                              objective=objectives.build(options, SPECIAL, cfg.vocab_size))
    state = _init(fns)
    step = jax.jit(functools.partial(train_lib.train_step, fns))
    for _ in range(3):
      state, metrics = step(state, _batch())
    evaluated = jax.jit(functools.partial(train_lib.eval_step, fns))(
        state.params, _batch(), jax.random.PRNGKey(0))
    runs.append((state.params, metrics, evaluated))
  (a, ma, ea), (b, mb, eb) = runs
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, atol=3e-5, rtol=1e-4), a, b)
  for key in ("loss", "accuracy", "grad_norm"):
    np.testing.assert_allclose(ma[key], mb[key], rtol=1e-5)
  for key in ea:
    np.testing.assert_allclose(ea[key], eb[key], rtol=1e-5)


def test_auto_dtype_is_resolved_once_per_run_and_kept_on_resume(tmp_path, monkeypatch):
  """`model.dtype=auto` on CPU: the answer is written beside the run's checkpoints, and a
  resume computes in it even on a CPU that would answer otherwise (a run moved to another
  machine)."""
  from lmjax import cpu_dtype
  monkeypatch.delenv(cpu_dtype.ENV, raising=False)
  config = tiny_config("clm_tiny", tmp_path, train__steps=2, train__checkpoint_every=2)
  workdir = str(tmp_path / "run")

  def run_with(flags, steps):
    monkeypatch.setattr(cpu_dtype, "cpu_flags", lambda: frozenset(flags))
    config.train.steps = steps
    train_lib.train_and_evaluate(experiment_from_dict(config.to_dict()), workdir)
    ckpt = Checkpointer(workdir)
    try:
      meta = ckpt.read_meta(ckpt.latest_step())
      assert meta["config"]["model"]["dtype"] == "auto"  # the config as given, for loaders
      return meta[train_lib.AUTO_DTYPE_KEY]
    finally:
      ckpt.close()

  assert config.model.dtype == "auto"
  assert run_with({"avx512f", "amx_bf16"}, 2) == "bfloat16_matmuls"  # an AMX CPU
  assert run_with({"avx2"}, 4) == "bfloat16_matmuls"  # the resume keeps it


def test_checkpoint_checksums_compile_once_for_a_state_shape(tmp_path):
  """Checksums are computed at every save: they must not recompile each time (they did,
  0.4 s a save)."""
  from lmjax import checkpoint
  state = {"w": jnp.ones((3, 7, 5)), "step": jnp.int32(0)}  # a shape no other test saves
  ckpt = Checkpointer(str(tmp_path))
  before = checkpoint._checksums._cache_size()
  for step in (1, 2, 3):
    ckpt.save(step, jax.tree.map(lambda x, s=step: x + s, state), {})
  ckpt.close()
  assert checkpoint._checksums._cache_size() == before + 1
  assert ckpt.all_steps() == [1, 2, 3]
