"""What users have on disk keeps working: run directories written by lmjax 0.1.0 (before
the redesign into one experiment schema) load, resume and start fine-tuning runs, and
experiment dicts of that release's fine-tuning schema read as today's."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest

from tiny import ROOT, finetune, tiny_config

FIXTURES = os.path.join(ROOT, "tests", "fixtures", "release_0_1")


@pytest.fixture
def old_runs(tmp_path):
  """Writable copies of the 0.1.0 run directories (a resume writes into them)."""
  shutil.copytree(FIXTURES, tmp_path / "old")
  return tmp_path / "old"


def _old_config(name):
  with open(os.path.join(FIXTURES, name, "checkpoints", "2", "meta", "metadata")) as f:
    return json.load(f)


def test_old_runs_load_and_score_as_they_did(old_runs):
  from lmjax import pretrained
  from lmjax.evaluation import evaluate_files
  for name in ("clm", "sft"):
    source = pretrained.load(str(old_runs / name))
    assert source.model.d_model == 8 and source.objective == "clm"
    assert source.source.endswith("step 2")
  sft = pretrained.load(str(old_runs / "sft"))
  assert "<|im_start|>" in sft.tokenizer.chat_template or sft.tokenizer.chat_template
  metrics = evaluate_files(pretrained.load(str(old_runs / "clm")),
                           [os.path.join(ROOT, "lmjax/assets/shakespeare/valid.txt")],
                           seq_len=32, batch_size=4, max_batches=2)
  assert np.isfinite(metrics["loss"]) and 7.0 < metrics["loss"] < 8.0  # ~ln 2048 after 2 steps


def test_an_old_pretraining_run_resumes_under_the_new_schema(old_runs, tmp_path):
  from lmjax.experiment import experiment_from_dict
  from lmjax.run import train_and_evaluate
  config = tiny_config("clm_tiny", tmp_path, model__d_model=8, model__num_layers=1,
                       model__num_heads=2, model__d_ff=16, model__max_len=64, train__steps=3,
                       train__checkpoint_every=3, train__eval_batches=1, train__log_every=1)
  train_and_evaluate(experiment_from_dict(config.to_dict()), str(old_runs / "clm"))
  lines = [json.loads(l) for l in (old_runs / "clm" / "metrics.jsonl").read_text().splitlines()]
  assert [r["step"] for r in lines if r["split"] == "train"] == [1, 2, 3]  # 1-2 old, 3 new
  assert (old_runs / "clm" / "checkpoints" / "3").is_dir()


def test_an_old_sft_run_resumes_and_an_old_run_starts_a_new_one(old_runs, tmp_path):
  from lmjax.experiment import default_config
  config = default_config("sft")
  data = os.path.join(ROOT, "experiments", "data")
  config["task"].update(train_file=os.path.join(data, "chat_train.jsonl"),
                        eval_file=os.path.join(data, "chat_eval.jsonl"))
  config["objective"]["truncation"] = "newest"
  config["data"]["seq_len"] = 64
  config["train"].update(steps=3, batch_size=4, log_every=1, eval_every=0, eval_batches=1,
                         checkpoint_every=3, keep_checkpoints=1)
  resumed = finetune(config, old_runs / "clm", old_runs / "sft")
  assert resumed["steps"] == 3 and (old_runs / "sft" / "checkpoints" / "3").is_dir()
  fresh = finetune(config, old_runs / "sft", tmp_path / "new")  # an old run as init_from
  assert fresh["objective"] == "sft" and np.isfinite(fresh["loss"])


def test_saved_configs_and_the_old_fine_tuning_schema_read_as_today(tmp_path):
  from lmjax.experiment import experiment_from_dict
  from lmjax.finetune import default_finetune_config
  saved = experiment_from_dict(_old_config("sft")["config"])  # MLM's fields at defaults
  assert saved.objective.kind == "sft" and saved.data.seq_len == 64
  old = default_finetune_config()
  old["task"].update(kind="dpo", train_file="t.jsonl", eval_file="e.jsonl", seq_len=96,
                     dropout_rate=0.0, truncation="off")
  old["dpo"].update(beta=0.3)
  exp = experiment_from_dict(old)
  assert exp.objective.kind == "dpo" and exp.objective.beta == 0.3
  assert exp.objective.truncation == "off" and exp.data.seq_len == 96
  assert exp.model.dropout_rate == 0.0 and exp.task.train_file == "t.jsonl"
  assert exp.train.steps == 300 and exp.train.eval_batches == 0  # that schema's defaults
