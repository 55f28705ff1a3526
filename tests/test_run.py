"""The one run builder (`lmjax.run`) and the loop's hooks (`lmjax.loop`)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tiny import tiny_config

FINETUNING = {"chat_tiny": "clm_tiny", "dpo_tiny": "clm_tiny", "finetune_pairs": "mlm_tiny",
              "finetune_regression": "mlm_tiny", "qa_tiny": "mlm_tiny"}


def _experiment(name, tmp_path, tiny_runs):
  from lmjax.experiment import experiment_from_dict
  if name in FINETUNING:
    import importlib
    config = importlib.import_module(f"experiments.{name}").get_config().to_dict()
    config["data"]["seq_len"] = 96 if name in ("chat_tiny", "dpo_tiny") else 32
    config["train"].update(batch_size=8, init_from=str(tiny_runs / FINETUNING[name]))
    return experiment_from_dict(config)
  return experiment_from_dict(tiny_config(name, tmp_path).to_dict())


@pytest.mark.parametrize("name", ["clm_tiny", "mlm_tiny", *FINETUNING])
def test_each_objective_batch_spec_is_what_its_datasets_yield(name, tmp_path, tiny_runs):
  """launch.compile compiles for `batch_spec` without reading data: it must describe the
  batches the run reads, key for key, shape for shape, dtype for dtype."""
  from lmjax.run import assemble
  parts = assemble(_experiment(name, tmp_path, tiny_runs), str(tmp_path / "run"))
  spec = parts.fns.objective.batch_spec(parts.exp.data.seq_len)
  for data in (parts.train_data, parts.eval_data):
    batch = data.batch(0, 4) if data is parts.train_data else data.eval_batch(0, 4)
    got = {k: (v.shape[1:], np.dtype(v.dtype)) for k, v in batch.items()}
    assert got == {k: (shape, np.dtype(dtype)) for k, (shape, dtype) in spec.items()}, name
  assert not (tmp_path / "run").exists()  # assembling writes nothing


def test_a_fine_tuning_run_takes_the_architecture_of_init_from(tiny_runs, tmp_path):
  from lmjax import pretrained
  from lmjax.run import assemble
  exp = _experiment("finetune_pairs", tmp_path, tiny_runs)
  assert exp.model.d_model != 32  # the experiment file's model section: defaults
  parts = assemble(exp, str(tmp_path / "run"))
  source = pretrained.load(str(tiny_runs / "mlm_tiny"))
  assert parts.exp.model.d_model == source.model.d_model == 32
  assert parts.exp.model.dropout_rate == 0.1  # computed as the experiment says
  assert parts.tokenizer.sha256 == source.tokenizer.sha256


def test_a_hook_of_research_code_sees_every_step_and_can_stop_the_run(tmp_path):
  from lmjax.experiment import experiment_from_dict
  from lmjax.loop import Hook
  from lmjax.run import train_and_evaluate

  class StopAtThree(Hook):
    def __init__(self):
      self.steps, self.started = [], None

    def start(self, ctx, step):
      self.started = step

    def after_step(self, ctx, step, state, metrics):
      self.steps.append((step, int(state.step)))
      return "enough" if step == 3 else None

  hook = StopAtThree()
  config = tiny_config("clm_tiny", tmp_path, train__steps=10, train__eval_every=2)
  metrics = train_and_evaluate(experiment_from_dict(config.to_dict()), str(tmp_path / "run"),
                               hooks=[hook])
  assert hook.started == 0 and hook.steps == [(1, 1), (2, 2), (3, 3)]
  assert (tmp_path / "run" / "checkpoints" / "3").is_dir()  # saved as a preemption saves
  assert np.isfinite(metrics["loss"])  # the step-2 evaluation: the latest there is
  evals = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
           if '"eval"' in l]
  assert [r["step"] for r in evals] == [2]
