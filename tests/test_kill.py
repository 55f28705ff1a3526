"""kill -9 at random moments (during async saves too), then the same command again: the
run ends bitwise equal to an uninterrupted one and leaves no temporary directories."""

import os
import random
import signal
import subprocess
import sys
import time

import jax
import numpy as np

from lmjax import train as train_lib
from lmjax.checkpoint import Checkpointer
from lmjax.experiment import experiment_from_dict
from tiny import ROOT, TINY_OVERRIDES, tiny_config

STEPS = 24


RUN = {"train.steps": STEPS, "train.checkpoint_every": 2, "train.log_every": 1,
       "train.eval_every": 12}


def _command(tmp_path, workdir):
  values = dict(TINY_OVERRIDES, **{"data.cache_dir": str(tmp_path / "cache")}, **RUN)
  return [sys.executable, "-m", "launch.train", "--config=experiments/clm_tiny.py",
          f"--workdir={workdir}", *[f"--config.{k}={v}" for k, v in values.items()]]


def _lines(path):
  return path.read_text().count("\n") if path.exists() else 0


def test_kill_9_three_times_then_resume_bitwise(tmp_path):
  # The uninterrupted run, in this process (the killed ones are the launcher's): the same
  # config as _command's flags, the same single CPU device.
  straight = tmp_path / "straight"
  config = tiny_config("clm_tiny", tmp_path, **{k.replace(".", "__"): v for k, v in RUN.items()})
  train_lib.train_and_evaluate(experiment_from_dict(config.to_dict()), str(straight))
  killed = tmp_path / "killed"
  rng = random.Random(0)
  kills = 0
  for _ in range(3):
    before = _lines(killed / "metrics.jsonl")
    proc = subprocess.Popen(_command(tmp_path, killed), cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 300
    while _lines(killed / "metrics.jsonl") <= before and proc.poll() is None:
      assert time.monotonic() < deadline
      time.sleep(0.05)
    time.sleep(rng.uniform(0.0, 1.5))  # somewhere in training, saving or evaluating
    if proc.poll() is None:
      os.killpg(proc.pid, signal.SIGKILL)
      kills += 1
    proc.wait(timeout=60)
  assert kills == 3
  final = subprocess.run(_command(tmp_path, killed), cwd=ROOT, capture_output=True, text=True,
                         timeout=300)
  assert final.returncode == 0, final.stderr[-2000:]
  names = os.listdir(killed / "checkpoints")
  assert all(name.isdigit() for name in names), names  # no *.orbax-checkpoint-tmp left
  a, b = (Checkpointer(str(d), async_save=False) for d in (straight, killed))
  sa, sb = a.restore_arrays(STEPS), b.restore_arrays(STEPS)
  a.close()
  b.close()
  assert jax.tree.structure(sa) == jax.tree.structure(sb)
  jax.tree.map(np.testing.assert_array_equal, sa, sb)  # params, optimizer state, step, rng
