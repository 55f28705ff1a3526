"""Tiny experiments on the bundled corpus, shared by the test modules."""

from __future__ import annotations

import hashlib
import importlib
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Small enough that a few dozen steps take seconds on two cores.
TINY_OVERRIDES = {
    "model.d_model": 32, "model.num_layers": 2, "model.num_heads": 2, "model.d_ff": 64,
    "data.seq_len": 32, "train.batch_size": 8, "train.log_every": 5, "train.eval_every": 0,
    "train.eval_batches": 2, "train.checkpoint_every": 10, "optimizer.warmup_steps": 5,
}


def tiny_config(name: str, tmp_path, arg: str | None = None, **overrides):
  """experiments/<name>.py shrunk by TINY_OVERRIDES (+ overrides, dotted keys as `a__b`)."""
  module = importlib.import_module(f"experiments.{name}")
  config = module.get_config(arg) if arg else module.get_config()
  changes = dict(TINY_OVERRIDES, **{k.replace("__", "."): v for k, v in overrides.items()})
  changes["data.cache_dir"] = str(tmp_path / "cache")
  for key, value in changes.items():
    *sections, field = key.split(".")  # model.moe.num_experts: a nested section
    node = config
    for section in sections:
      node = node[section]
    node[field] = value
  return config


def tree_digest(folder) -> dict[str, str]:
  """{relative path: sha256} of every file below `folder`."""
  out = {}
  for d, _, files in os.walk(folder):
    for f in files:
      path = os.path.join(d, f)
      with open(path, "rb") as fh:
        out[os.path.relpath(path, folder)] = hashlib.sha256(fh.read()).hexdigest()
  return out


def kill_twice(start, metrics, seed: int = 1, timeout: float = 300) -> None:
  """Starts a run (`start()` returns its Popen, in a session of its own) and kills it with
  SIGKILL at a random moment after its next metrics line, twice."""
  import random
  import signal
  import time
  rng = random.Random(seed)
  lines = lambda: metrics.read_text().count("\n") if metrics.exists() else 0
  for _ in range(2):
    before = lines()
    proc = start()
    deadline = time.monotonic() + timeout
    while lines() <= before and proc.poll() is None:
      assert time.monotonic() < deadline
      time.sleep(0.05)
    time.sleep(rng.uniform(0.0, 1.0))
    if proc.poll() is None:
      os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)


def kill_once(proc, metrics, timeout: float = 300) -> None:
  """Kills `proc` (a run in a session of its own) with SIGKILL 0.1 s after its first new
  metrics line: one kill, between checkpoints, for a kind of run whose state must resume
  exactly (killed again after resuming, a pretraining run: tests/test_kill.py)."""
  import signal
  import time
  lines = lambda: metrics.read_text().count("\n") if metrics.exists() else 0
  before, deadline = lines(), time.monotonic() + timeout
  while lines() <= before and proc.poll() is None:
    assert time.monotonic() < deadline
    time.sleep(0.05)
  time.sleep(0.1)
  if proc.poll() is None:
    os.killpg(proc.pid, signal.SIGKILL)
  proc.wait(timeout=60)


def assert_same_checkpoint(a, b, step: int) -> None:
  """The runs in folders `a` and `b` hold bitwise-equal state at `step`."""
  import jax
  import numpy as np
  from lmjax.checkpoint import Checkpointer
  x, y = (Checkpointer(str(d), async_save=False) for d in (a, b))
  try:
    jax.tree.map(np.testing.assert_array_equal, x.restore_arrays(step), y.restore_arrays(step))
  finally:
    x.close()
    y.close()


def finetune(config: dict, init_from, workdir) -> dict:
  """A fine-tuning run of `config` (a plain dict, today's schema) from `init_from`, as
  launch.finetune makes it; returns its results.json."""
  import json
  from lmjax.experiment import experiment_from_dict
  from lmjax.run import train_and_evaluate
  config = {**config, "train": {**config.get("train", {}), "init_from": str(init_from)}}
  train_and_evaluate(experiment_from_dict(config), str(workdir))
  with open(os.path.join(str(workdir), "results.json")) as f:
    return json.load(f)
