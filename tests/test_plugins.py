"""Objectives as plug-ins: an objective written entirely in an experiment file
(experiments/custom_objective.py) trains through the launcher with the loop's guarantees."""

import json
import subprocess
import sys

import jax
import numpy as np
import pytest

from tiny import ROOT, tiny_config
from lmjax import objectives
from lmjax import train as train_lib
from lmjax.checkpoint import Checkpointer
from lmjax.errors import UserError
from lmjax.experiment import experiment_from_dict

TINY = ["--config.model.d_model=32", "--config.model.num_layers=2", "--config.model.num_heads=2",
        "--config.model.d_ff=64", "--config.data.seq_len=32", "--config.train.batch_size=8",
        "--config.train.log_every=2", "--config.train.eval_every=2",
        "--config.train.eval_batches=2", "--config.train.checkpoint_every=2"]


def _train(workdir, *args):
  return subprocess.run([sys.executable, "-m", "launch.train",
                         "--config=experiments/custom_objective.py", f"--workdir={workdir}",
                         *TINY, *args], cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_the_custom_objective_trains_through_the_launcher_and_resumes(tmp_path):
  """Its first two steps in process (TINY's settings), the next two through launch.train,
  which finds the plug-in in the experiment file and resumes the run."""
  config = tiny_config("custom_objective", tmp_path, train__steps=2, train__log_every=2,
                       train__eval_every=2, train__checkpoint_every=2,
                       objective__penalty=0.3, optimizer__warmup_steps=30)
  train_lib.train_and_evaluate(experiment_from_dict(config.to_dict()), str(tmp_path / "run"))
  again = _train(tmp_path / "run", "--config.train.steps=4", "--config.objective.penalty=0.3",
                 f"--config.data.cache_dir={tmp_path / 'cache'}")
  assert again.returncode == 0, again.stderr[-3000:]
  assert "resumed from" in again.stderr and "step 2" in again.stderr
  records = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
  for split in ("train", "eval"):
    steps = [r["step"] for r in records if r["split"] == split]
    assert steps == [2, 4], split
    assert all(0 < r["entropy"] < np.log(2048) + 1e-3 for r in records if r["split"] == split)
  ckpt = Checkpointer(str(tmp_path / "run"), read_only=True)
  try:
    config = ckpt.read_meta(4)["config"]["objective"]
  finally:
    ckpt.close()
  assert config["kind"] == "clm_confidence_penalty" and config["penalty"] == 0.3

  typo = _train(tmp_path / "other", "--config.objective.penalti=0.3")
  assert typo.returncode == 2 and typo.stderr.strip().splitlines()[-1] == (
      'error: --config.objective.penalti: no such config key; did you mean "penalty"? (see the '
      "experiment file and lmjax/experiment.py for the fields)")
  negative = _train(tmp_path / "other", "--config.objective.penalty=-1")
  assert negative.returncode == 2
  assert negative.stderr.strip().splitlines()[-1] == "error: objective.penalty must be >= 0, got -1.0"


def _run(tmp_path, name, **overrides):
  config = tiny_config("custom_objective", tmp_path, **overrides)
  exp = experiment_from_dict(config.to_dict())
  train_lib.train_and_evaluate(exp, str(tmp_path / name))
  ckpt = Checkpointer(str(tmp_path / name), read_only=True)
  try:
    state = ckpt.restore_arrays(ckpt.latest_step())
  finally:
    ckpt.close()
  records = [json.loads(line) for line in open(tmp_path / name / "metrics.jsonl")]
  return state, [r for r in records if r["split"] == "train"]


def test_the_custom_objective_keeps_accumulation_and_exact_resume(tmp_path):
  fixed = dict(optimizer__schedule="constant", optimizer__warmup_steps=0)  # steps=2 then 4
  whole, lines = _run(tmp_path, "whole", train__steps=4, **fixed)
  _run(tmp_path, "split", train__steps=2, train__checkpoint_every=2, **fixed)
  split, _ = _run(tmp_path, "split", train__steps=4, train__checkpoint_every=2, **fixed)
  jax.tree.map(np.testing.assert_array_equal, whole, split)  # resume is exact
  accumulated, accumulated_lines = _run(tmp_path, "accum", train__steps=4,
                                        train__grad_accum_steps=4, **fixed)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=3e-5),
               whole["params"], accumulated["params"])
  np.testing.assert_allclose([r["entropy"] for r in lines],
                             [r["entropy"] for r in accumulated_lines], rtol=1e-5)


def test_without_its_penalty_it_is_clm(tmp_path):
  """penalty=0: the same steps as the built-in CLM (its loss unfused), so the plug-in path
  is the loop CLM runs on."""
  plugin, plugin_lines = _run(tmp_path, "plugin", train__steps=3, objective__penalty=0.0)
  config = tiny_config("clm_tiny", tmp_path, train__steps=3, objective__fused_head="off")
  for key in ("model", "optimizer", "data"):  # the same experiment but for the objective
    config[key] = tiny_config("custom_objective", tmp_path)[key]
  train_lib.train_and_evaluate(experiment_from_dict(config.to_dict()), str(tmp_path / "clm"))
  records = [json.loads(line) for line in open(tmp_path / "clm" / "metrics.jsonl")]
  clm_lines = [r for r in records if r["split"] == "train"]
  np.testing.assert_allclose([r["loss"] for r in plugin_lines], [r["loss"] for r in clm_lines],
                             rtol=1e-6)
  assert [r["step"] for r in clm_lines] == [r["step"] for r in plugin_lines]


def test_registry_rules():
  with pytest.raises(ValueError, match="'clm' is lmjax's own"):
    objectives.register("clm")(type("Mine", (objectives.CLM,), {"__module__": "research"}))
  with pytest.raises(TypeError, match="takes an Objective subclass"):
    objectives.register("not_one")(object)
  with pytest.raises(UserError, match="objective.kind must be one of clm, mlm, classification"):
    experiment_from_dict({"objective": {"kind": "nope"}})
  assert objectives.registered()[:5] == ["clm", "mlm", "classification", "regression", "qa"]


def test_a_plugin_that_would_break_later_is_refused_when_registered():
  """Mistakes that would otherwise surface at the first step, or never: options that lack
  what the inherited loss reads, and a metrics method under the name lmjax 0.1 used."""
  import dataclasses

  @dataclasses.dataclass(frozen=True)
  class Bare(objectives.ObjectiveConfig):
    kind: str = "clm_bare"

  with pytest.raises(TypeError, match="must subclass CLM's options, .*LMConfig"):
    objectives.register("clm_bare")(type("Bare", (objectives.CLM,), {"config_class": Bare}))
  with pytest.raises(TypeError, match="summarize: the method is now called `metrics`"):
    objectives.register("clm_old")(type("Old", (objectives.CLM,),
                                        {"summarize": lambda self, sums: sums}))
  assert "clm_bare" not in objectives.registered() and "clm_old" not in objectives.registered()
