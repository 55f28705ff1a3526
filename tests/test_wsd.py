"""Warmup-stable-decay schedules, and cooldowns branched from a stable run's checkpoint that
end bit for bit where an uninterrupted wsd run does."""

import subprocess
import sys

import jax
import numpy as np
import pytest

from tiny import ROOT, TINY_OVERRIDES, assert_same_checkpoint, tiny_config
from lmjax import train as train_lib
from lmjax.errors import UserError
from lmjax.experiment import experiment_from_dict
from lmjax.optim import OptimizerConfig, decay_start, learning_rate_schedule


def _lrs(total, **fields):
  cfg = OptimizerConfig(**{"learning_rate": 1.0, "warmup_steps": 10, "schedule": "wsd",
                           "end_lr_ratio": 0.0, **fields})
  return np.asarray(jax.vmap(learning_rate_schedule(cfg, total))(np.arange(total)))


@pytest.mark.parametrize("shape,at_half", [("linear", 0.5), ("cosine", 0.5),
                                           ("1-sqrt", 1 - np.sqrt(0.5))])
def test_wsd_warms_up_holds_the_peak_then_decays(shape, at_half):
  lr = _lrs(110, decay_steps=20, decay_shape=shape)
  np.testing.assert_allclose(lr[:10], np.arange(10) / 10, rtol=1e-6)  # linear warmup
  assert (lr[10:90] == 1.0).all()  # the peak, exactly, until the decay starts
  np.testing.assert_allclose(lr[100], at_half, rtol=1e-6)  # halfway through the decay
  assert (np.diff(lr[90:]) < 0).all() and lr[-1] < 0.12


def test_the_decay_start_three_ways():
  a = _lrs(100, decay_steps=20)
  np.testing.assert_array_equal(a, _lrs(100, decay_fraction=0.2))
  np.testing.assert_array_equal(a, _lrs(100, decay_start=80))
  assert decay_start(OptimizerConfig(schedule="wsd", decay_start=500), 100) == 500  # stable
  assert (_lrs(100, decay_start=500)[10:] == 1.0).all()
  with pytest.raises(ValueError, match="decay_steps and optimizer.decay_start both set"):
    OptimizerConfig(decay_steps=5, decay_start=5)


def test_the_stable_phase_is_a_constant_schedule_bit_for_bit():
  constant = OptimizerConfig(learning_rate=3e-3, warmup_steps=10, schedule="constant")
  wsd = OptimizerConfig(learning_rate=3e-3, warmup_steps=10, schedule="wsd", decay_start=60)
  counts = np.arange(60)
  np.testing.assert_array_equal(jax.vmap(learning_rate_schedule(constant, 1000))(counts),
                                jax.vmap(learning_rate_schedule(wsd, 100))(counts))


def _exp(tmp, **overrides):
  config = tiny_config("clm_tiny", tmp, **{"train__checkpoint_every": 4,
                                           "train__keep_checkpoints": 10,
                                           "optimizer__learning_rate": 5e-3, **overrides})
  return experiment_from_dict(config.to_dict())


@pytest.fixture(scope="module")
def stable(tmp_path_factory):
  """One stable (constant-rate) run, checkpoints every 4 steps to 16, that every branch of
  this module starts from (a constant rate does not depend on the run's length, so its step
  8 is that of a shorter stable run)."""
  tmp = tmp_path_factory.mktemp("wsd")
  train_lib.train_and_evaluate(_exp(tmp, train__steps=16, optimizer__schedule="constant"),
                               str(tmp / "stable"))
  return tmp / "stable"


WSD = dict(optimizer__schedule="wsd", optimizer__decay_shape="1-sqrt",
           optimizer__end_lr_ratio=0.0)


@pytest.fixture(scope="module")
def whole14(stable):
  """An uninterrupted wsd run of 14 steps decaying from step 8: where the cooldowns of both
  tests below branched at step 8 must end."""
  train_lib.train_and_evaluate(_exp(stable.parent, train__steps=14, optimizer__decay_start=8,
                                    **WSD), str(stable.parent / "whole14"))
  return stable.parent / "whole14"


def test_a_cooldown_branched_from_a_stable_run_equals_an_uninterrupted_wsd_run(
    tmp_path, stable, whole14):
  """The cooldown given as a length (decay_steps=6); and running it again resumes from its
  own steps. (Given as its start, decay_start=8: the 14-step trial of the sweep below, through
  launch.train.)"""
  wsd = dict(train__steps=14, **WSD)
  other = _exp(tmp_path, optimizer__decay_steps=6, train__branch_from=f"{stable}:8", **wsd)
  train_lib.train_and_evaluate(other, str(tmp_path / "branch6"))
  train_lib.train_and_evaluate(other, str(tmp_path / "branch6"))
  assert_same_checkpoint(whole14, tmp_path / "branch6", 14)


def test_bad_branches_are_one_line(tmp_path, stable):
  wsd = dict(train__steps=12, optimizer__schedule="wsd", optimizer__decay_start=8)
  cases = [
      (dict(train__branch_from=f"{stable}:6"),
       "has no checkpoint at step 6 \\(it has 4, 8, 12, 16;"),
      (dict(train__branch_from=str(stable)), "must be RUN:STEP"),
      (dict(train__branch_from=f"{tmp_path}/nothing:8"), "holds no checkpoints"),
      (dict(train__branch_from=f"{stable}:8", optimizer__learning_rate=1e-3),
       "the learning rate before step 8 differs from the source run's"),
      (dict(train__branch_from=f"{stable}:8", optimizer__kind="lion"),
       "trains with optimizer.kind=adamw, this one with lion"),
      (dict(train__branch_from=f"{stable}:8", train__steps=8), "must be past the branch step"),
      (dict(train__branch_from=f"{stable}:8", model__d_ff=128), "another architecture"),
  ]
  for i, (overrides, message) in enumerate(cases):
    with pytest.raises(UserError, match=message):
      train_lib.train_and_evaluate(_exp(tmp_path, **{**wsd, **overrides}),
                                   str(tmp_path / f"bad{i}"))
    assert not (tmp_path / f"bad{i}").exists()  # refused before anything is written


def test_a_sweep_branches_several_cooldowns_from_one_stable_run(tmp_path, stable,
                                                                whole14):
  """experiments/sweeps/cooldowns.py's form, through launch.sweep's command line: a grid over
  train.steps, every trial branched from the same stable checkpoint; each ends bit for bit
  where a wsd run of its length from step 0 ends (the 14-step one: the fixture's)."""
  sweep = tmp_path / "cooldowns.py"
  sweep.write_text("from lmjax.sweep import Sweep\n\n\ndef get_sweep():\n"
                   "  return Sweep(grid={'train.steps': [10, 14]}, fixed={"
                   "'optimizer.schedule': 'wsd', 'optimizer.decay_start': 8, "
                   "'optimizer.decay_shape': '1-sqrt', 'optimizer.end_lr_ratio': 0.0})\n")
  changes = {**TINY_OVERRIDES, "data.cache_dir": str(tmp_path / "cache"),
             "train.checkpoint_every": 4, "train.keep_checkpoints": 10,
             "optimizer.learning_rate": 5e-3, "train.branch_from": f"{stable}:8"}
  proc = subprocess.run([sys.executable, "-m", "launch.sweep", "--config=experiments/clm_tiny.py",
                         f"--sweep={sweep}", f"--workdir={tmp_path / 'cool'}", "--",
                         *(f"--config.{k}={v}" for k, v in changes.items())],
                        cwd=ROOT, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  trials = {int(d.name.split("=")[-1]): d for d in (tmp_path / "cool").iterdir() if "=" in d.name}
  assert sorted(trials) == [10, 14]
  assert_same_checkpoint(whole14, trials[14], 14)
  train_lib.train_and_evaluate(_exp(tmp_path, train__steps=10, optimizer__decay_start=8, **WSD),
                               str(tmp_path / "whole10"))
  assert_same_checkpoint(tmp_path / "whole10", trials[10], 10)
