"""lm-evaluation-harness: lmjax's model class against lm-eval's own `hf` model on the same
weights (exported by launch.convert), on small local tasks; bounded compilations."""

from __future__ import annotations

import json
import os
import subprocess
import sys

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # local JSON tasks: nothing to download
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest

from tiny import ROOT

TASKS = ["lmjax_mc", "lmjax_gen", "lmjax_ppl"]
INCLUDE = os.path.join(ROOT, "tests", "lm_eval_tasks")


@pytest.fixture(scope="module")
def both(tiny_runs, tmp_path_factory):
  """(lmjax results, hf results) with per-request samples."""
  import lm_eval
  from lm_eval.tasks import TaskManager
  from lmjax import harness, pretrained
  os.chdir(ROOT)  # the task files name their data relative to the checkout
  exported = tmp_path_factory.mktemp("hf") / "clm"
  subprocess.run([sys.executable, "-m", "launch.convert", f"--input={tiny_runs / 'clm_tiny'}",
                  f"--output={exported}"], cwd=ROOT, check=True, capture_output=True, timeout=300)
  ours = harness.run(pretrained.load(str(tiny_runs / "clm_tiny")), TASKS, batch_size=4,
                     include_path=INCLUDE, log_samples=True)
  theirs = lm_eval.simple_evaluate(
      model="hf", model_args=f"pretrained={exported},dtype=float32,add_bos_token=True",
      tasks=TASKS, batch_size=4, device="cpu", log_samples=True,
      task_manager=TaskManager(include_path=INCLUDE, include_defaults=False))
  return ours, theirs


def _responses(results, task):
  return [s["resps"] for s in sorted(results["samples"][task], key=lambda s: s["doc_id"])]


def test_accuracies_equal_the_hf_backend(both):
  ours, theirs = both
  for task, metric in (("lmjax_mc", "acc,none"), ("lmjax_mc", "acc_norm,none"),
                       ("lmjax_gen", "exact_match,none")):
    assert ours["results"][task][metric] == theirs["results"][task][metric], (task, metric)
  for metric in ("word_perplexity,none", "byte_perplexity,none"):
    assert ours["results"]["lmjax_ppl"][metric] == pytest.approx(
        theirs["results"]["lmjax_ppl"][metric], rel=1e-4)


def test_per_request_loglikelihoods_within_1e4(both):
  ours, theirs = both
  for task in ("lmjax_mc", "lmjax_ppl"):
    a, b = _responses(ours, task), _responses(theirs, task)
    assert len(a) == len(b) > 10
    for ra, rb in zip(a, b):
      la = np.array([r[0][0] if isinstance(r[0], (list, tuple)) else r[0] for r in ra], float)
      lb = np.array([r[0][0] if isinstance(r[0], (list, tuple)) else r[0] for r in rb], float)
      np.testing.assert_allclose(la, lb, atol=1e-4, rtol=0)
  assert _responses(ours, "lmjax_gen") == _responses(theirs, "lmjax_gen")  # same greedy text


def test_a_thousand_requests_compile_a_few_shapes(tiny_runs):
  from lmjax import harness, pretrained

  class Request:
    def __init__(self, *args):
      self.args = args

  model = harness.LmjaxLM(pretrained.load(str(tiny_runs / "clm_tiny")), batch_size=16)
  rng = np.random.default_rng(0)
  words = open(os.path.join(ROOT, "lmjax", "assets", "shakespeare", "valid.txt")).read().split()
  requests = []
  for _ in range(1000):
    start, n = int(rng.integers(0, len(words) - 200)), int(rng.integers(1, 150))
    requests.append(Request(" ".join(words[start:start + n]), " " + words[start + n]))
  out = model.loglikelihood(requests)
  assert len(out) == 1000 and all(np.isfinite(ll) and ll < 0 for ll, _ in out)
  buckets = {harness.bucket(n, model.cfg.max_len) for n in range(1, model.cfg.max_len + 1)}
  assert len(model.compiled_shapes) <= len(buckets) <= 5


def test_local_tasks_alone_skip_indexing_the_built_in_ones():
  """lm-eval indexes its 14,000 built-in tasks in 20-50 s; a run that asks only for
  --include_path tasks does without (a name found nowhere falls back to the full index:
  the launcher test below)."""
  from lmjax import harness
  manager = harness.task_manager(("lmjax_mc", "lmjax_ppl"), INCLUDE)
  assert set(manager.all_tasks) == {"lmjax_mc", "lmjax_gen", "lmjax_ppl"}
  assert harness.task_manager(("lmjax_mc", "lmjax_ppl"), INCLUDE) is manager  # kept


def test_launcher_output_paths(tiny_runs, tmp_path):
  """A path (the README's) is taken from the current directory, also for a Hugging Face
  model, whose folder stays as it was; a task found nowhere is one line. (A bare --output
  name landing inside an lmjax run, end to end through launch.lm_eval, is checked by
  tests/test_chat_use.py::test_lm_eval_with_the_chat_template; output_path's rules for
  both kinds of directory by tests/test_output_paths.py.)"""
  run = tmp_path / "run"
  os.symlink(tiny_runs / "clm_tiny", run)
  hf, tasks = tiny_runs / "gpt2", tmp_path / "tasks"  # the task, its data found from anywhere
  tasks.mkdir()
  yaml = open(os.path.join(INCLUDE, "lmjax_mc.yaml")).read()
  (tasks / "lmjax_mc.yaml").write_text(yaml.replace("tests/", f"{ROOT}/tests/"))
  before = sorted(os.listdir(hf))
  proc = subprocess.run([sys.executable, "-m", "launch.lm_eval", f"--workdir={hf}",
                         "--tasks=lmjax_mc", f"--include_path={tasks}", "--limit=4",
                         "--output=results/lme.json"], cwd=tmp_path, capture_output=True,
                        text=True, timeout=300, env=dict(os.environ, PYTHONPATH=ROOT))
  assert proc.returncode == 0, proc.stderr[-3000:]
  result = json.loads((tmp_path / "results" / "lme.json").read_text())
  assert result["model"].startswith(str(hf)) and "lmjax_mc" in result["results"]
  assert 0 <= result["results"]["lmjax_mc"]["acc,none"] <= 1 and result["compiled_shapes"] >= 1
  assert sorted(os.listdir(hf)) == before
  bad = subprocess.run([sys.executable, "-m", "launch.lm_eval", f"--workdir={run}",
                        "--tasks=no_such_task"], cwd=ROOT, capture_output=True, text=True,
                       timeout=300)
  assert bad.returncode == 2 and bad.stderr.strip().splitlines()[-1].startswith("error: ")


def test_pretraining_logs_harness_metrics(tmp_path):
  from lmjax import train as train_lib
  from lmjax.experiment import experiment_from_dict
  from tiny import tiny_config
  os.chdir(ROOT)
  config = tiny_config("clm_tiny", tmp_path, train__steps=4, train__lm_eval_tasks=("lmjax_mc",),
                       train__lm_eval_every=2, train__lm_eval_limit=6,
                       train__lm_eval_include_path=INCLUDE)
  train_lib.train_and_evaluate(experiment_from_dict(config.to_dict()), str(tmp_path / "run"))
  records = [json.loads(l) for l in open(tmp_path / "run" / "metrics.jsonl")]
  scored = [r for r in records if r["split"] == "lm_eval"]
  assert [r["step"] for r in scored] == [2, 4]
  assert all(0 <= r["lmjax_mc/acc"] <= 1 for r in scored)
  assert list((tmp_path / "run" / "tensorboard").iterdir())
