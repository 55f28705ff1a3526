"""Fine-tuning runs on the pretraining loop: sharded like it, resumed like it, preempted like
it; GLUE-style pair classification and regression report the field's measures."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from tiny import ROOT
from lmjax.checkpoint import Checkpointer
from lmjax.objectives.task_heads import classification_measures, regression_measures

SMALL = ["--config.data.seq_len=32", "--config.train.batch_size=16", "--config.train.log_every=1",
         "--config.optimizer.warmup_steps=2"]


def _finetune(init_from, workdir, *args, config="experiments/finetune_pairs.py", timeout=400):
  return subprocess.run([sys.executable, "-m", "launch.finetune", f"--config={config}",
                         f"--init_from={init_from}", f"--workdir={workdir}", *SMALL, *args],
                        cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def _in_process(init_from, workdir, config="finetune_pairs", **sections) -> dict:
  """launch.finetune's run of experiments/CONFIG.py with SMALL's flags (and `sections`:
  {section: {field: value}}), in this process: the reference a launcher run is held to."""
  import importlib
  from tiny import finetune
  base = importlib.import_module(f"experiments.{config}").get_config().to_dict()
  base["data"]["seq_len"] = 32
  base["optimizer"]["warmup_steps"] = 2
  base["train"].update(batch_size=16, log_every=1)
  for section, fields in sections.items():
    base[section].update(fields)
  return finetune(base, init_from, workdir)


def _train_losses(workdir):
  return [r["loss"] for r in map(json.loads, open(workdir / "metrics.jsonl"))
          if r["split"] == "train"]


def test_eight_devices_with_fsdp_equal_one_device(tiny_runs, tmp_path):
  """The one-device run in process (the launcher's own path is the 8-device run's)."""
  args = ["--config.train.steps=4", "--config.train.eval_every=0",
          "--config.model.dropout_rate=0.0"]
  _in_process(tiny_runs / "mlm_tiny", tmp_path / "one", train=dict(steps=4, eval_every=0),
              model=dict(dropout_rate=0.0))
  eight = _finetune(tiny_runs / "mlm_tiny", tmp_path / "eight", "--cpu_devices=8",
                    "--config.mesh.data=2", "--config.mesh.fsdp=4", *args)
  assert eight.returncode == 0, eight.stderr[-3000:]
  assert "8 device(s), mesh {'data': 2, 'fsdp': 4, 'expert': 1, 'tensor': 1}" in eight.stderr
  np.testing.assert_allclose(_train_losses(tmp_path / "eight"), _train_losses(tmp_path / "one"),
                             rtol=1e-4)
  a, b = (json.loads((tmp_path / d / "results.json").read_text()) for d in ("one", "eight"))
  assert a["examples"] == b["examples"] == 150 and a["accuracy"] == b["accuracy"]
  assert abs(a["loss"] - b["loss"]) < 1e-4 and set(a) >= {"f1", "mcc", "accuracy"}
  assert all(np.isfinite(a[m]) for m in ("f1", "mcc", "accuracy"))


def _lines(path):
  return path.read_text().count("\n") if path.exists() else 0


def _started(command, workdir, lines, stderr=subprocess.DEVNULL):
  """launch.finetune started in a session of its own, once metrics.jsonl has `lines` lines."""
  proc = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=stderr,
                          text=True, start_new_session=True)
  deadline = time.monotonic() + 300
  while _lines(workdir / "metrics.jsonl") < lines:
    assert time.monotonic() < deadline and proc.poll() is None
    time.sleep(0.05)
  return proc


def test_sigterm_saves_then_kill_9_and_rerun_end_bitwise_equal(tiny_runs, tmp_path):
  """One fine-tuning run through launch.finetune meets the loop's `Preemption` hook (SIGTERM
  saves the current step and exits 0), is resumed and killed with SIGKILL, and run again to
  the end: bitwise where the uninterrupted run (in process) ends. (Killed twice and more,
  a pretraining run: tests/test_kill.py; that the loop resumes from a signal's step,
  tests/test_launch.py's signal test.)"""
  steps = ["--config.train.steps=40", "--config.train.checkpoint_every=8",
           "--config.train.eval_every=20"]
  _in_process(tiny_runs / "mlm_tiny", tmp_path / "straight",
              train=dict(steps=40, checkpoint_every=8, eval_every=20))
  killed = tmp_path / "killed"
  command = [sys.executable, "-m", "launch.finetune", "--config=experiments/finetune_pairs.py",
             f"--init_from={tiny_runs / 'mlm_tiny'}", f"--workdir={killed}", *SMALL, *steps]
  proc = _started(command, killed, 3, subprocess.PIPE)
  proc.send_signal(signal.SIGTERM)
  _, err = proc.communicate(timeout=120)
  assert proc.returncode == 0, err[-3000:]
  saved = [int(n) for n in os.listdir(killed / "checkpoints")]
  assert f"preempted: checkpoint of step {max(saved)} is saved; exiting" in err
  assert 3 <= max(saved) < 40
  proc = _started(command, killed, _lines(killed / "metrics.jsonl") + 1)
  time.sleep(0.2)
  if proc.poll() is None:
    os.killpg(proc.pid, signal.SIGKILL)
  proc.wait(timeout=60)
  final = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=400)
  assert final.returncode == 0, final.stderr[-3000:]
  a, b = (Checkpointer(str(d), async_save=False) for d in (tmp_path / "straight", killed))
  sa, sb = a.restore_arrays(40), b.restore_arrays(40)
  a.close()
  b.close()
  jax.tree.map(np.testing.assert_array_equal, sa, sb)
  assert (json.loads((killed / "results.json").read_text()) ==
          json.loads((tmp_path / "straight" / "results.json").read_text()))


@pytest.mark.parametrize("config,measures,inits", [
    ("finetune_pairs", {"accuracy", "f1", "mcc"}, ("clm_tiny",)),  # from mlm_tiny: the
    # one-device run of test_eight_devices_with_fsdp_equal_one_device
    ("finetune_regression", {"pearson", "spearman", "mse"}, ("mlm_tiny", "clm_tiny")),
])
def test_glue_style_experiments_report_their_measures(tiny_runs, tmp_path, config, measures,
                                                      inits):
  """In process (the launcher is tested above): an encoder and a decoder backbone."""
  for init in inits:
    result = _in_process(tiny_runs / init, tmp_path / init, config,
                         train=dict(steps=3, eval_every=0))
    assert measures <= set(result) and result["examples"] == 150
    assert all(np.isfinite(result[m]) for m in measures)


def test_task_metrics_match_their_definitions():
  rng = np.random.default_rng(0)
  truth = rng.integers(0, 2, 500)
  pred = np.where(rng.random(500) < 0.8, truth, 1 - truth)
  tp, tn = np.sum((pred == 1) & (truth == 1)), np.sum((pred == 0) & (truth == 0))
  fp, fn = np.sum((pred == 1) & (truth == 0)), np.sum((pred == 0) & (truth == 1))
  got = classification_measures(pred, truth, 2)
  assert got["f1"] == pytest.approx(2 * tp / (2 * tp + fp + fn))
  mcc = (tp * tn - fp * fn) / np.sqrt(float((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn)))
  assert got["mcc"] == pytest.approx(mcc)
  x = np.array([1.0, 2.0, 2.0, 3.0, 5.0])
  y = np.array([2.0, 1.0, 4.0, 4.0, 6.0])
  got = regression_measures(x, y)
  assert got["pearson"] == pytest.approx(np.corrcoef(x, y)[0, 1])
  # Spearman = Pearson of average ranks: x ranks 0, 1.5, 1.5, 3, 4; y ranks 1, 0, 2.5, 2.5, 4
  assert got["spearman"] == pytest.approx(np.corrcoef([0, 1.5, 1.5, 3, 4], [1, 0, 2.5, 2.5, 4])[0, 1])
