"""A damaged newest checkpoint is named in a warning, moved aside (not deleted), and the
run resumes from the newest intact step."""

import os
import shutil

import pytest
from absl import logging

from lmjax import train as train_lib
from lmjax.checkpoint import Checkpointer
from lmjax.experiment import experiment_from_dict
from tiny import tiny_config


def _flip_bytes(step_dir):
  data = [os.path.join(d, f) for d, _, files in os.walk(os.path.join(step_dir, "state"))
          for f in files if os.sep + "d" + os.sep in os.path.join(d, f)]
  path = max(data, key=os.path.getsize)  # the largest chunk: parameters
  raw = bytearray(open(path, "rb").read())
  for i in range(len(raw) // 2, len(raw) // 2 + 64):
    raw[i] ^= 0xFF
  open(path, "wb").write(bytes(raw))


def _truncate(step_dir):
  data = [os.path.join(d, f) for d, _, files in os.walk(os.path.join(step_dir, "state"))
          for f in files if os.sep + "d" + os.sep in os.path.join(d, f)]
  path = max(data, key=os.path.getsize)
  os.truncate(path, os.path.getsize(path) // 2)


def _delete_metadata(step_dir):
  os.remove(os.path.join(step_dir, "state", "_METADATA"))


def _empty(step_dir):
  shutil.rmtree(step_dir)
  os.mkdir(step_dir)


DAMAGE = {"flipped bytes": _flip_bytes, "truncated file": _truncate,
          "deleted metadata": _delete_metadata, "empty directory": _empty}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  tmp = tmp_path_factory.mktemp("damage")
  config = tiny_config("clm_tiny", tmp, train__steps=4, train__checkpoint_every=2)
  train_lib.train_and_evaluate(experiment_from_dict(config.to_dict()), str(tmp / "run"))
  return tmp, config


def _resume_after(tmp_path, trained, damage):
  src_tmp, config = trained
  workdir = tmp_path / "run"
  shutil.copytree(src_tmp / "run", workdir)
  damage(workdir)
  return workdir, _train_saying(config, workdir, "warning")


def _train_saying(config, workdir, level: str) -> list[str]:
  """Trains `config` in `workdir` in this process; the absl messages logged at `level`."""
  said, original = [], getattr(logging, level)
  setattr(logging, level, lambda msg, *args: said.append(msg % args if args else msg))
  try:
    train_lib.train_and_evaluate(experiment_from_dict(config.to_dict()), str(workdir))
  finally:
    setattr(logging, level, original)
  return said


# A stray entry beside two of the damaged steps (one resume sets aside both): an unfinished
# save's temporary directory, and a name that is not a step.
STRAY = {"deleted metadata": ("6.orbax-checkpoint-tmp-1700000000", "unfinished save"),
         "empty directory": ("latest", "not a step directory")}


@pytest.mark.parametrize("kind", DAMAGE)
def test_damaged_newest_step_is_set_aside(tmp_path, trained, kind):
  stray, reason = STRAY.get(kind, (None, None))

  def damage(w):
    DAMAGE[kind](str(w / "checkpoints" / "4"))
    if stray:
      os.mkdir(w / "checkpoints" / stray)

  workdir, warnings = _resume_after(tmp_path, trained, damage)
  assert any(w.startswith("checkpoint 4: damaged") for w in warnings), warnings
  aside = sorted(os.listdir(workdir / "checkpoints_damaged"))
  assert [n for n in aside if n.startswith("4.")] and len(aside) == (2 if stray else 1), aside
  if stray:
    assert any(w.startswith(f"checkpoint {stray}: {reason}") for w in warnings), warnings
    assert [n for n in aside if n.startswith(stray)], aside
  assert sorted(os.listdir(workdir / "checkpoints")) == ["2", "4"]
  ckpt = Checkpointer(str(workdir))
  assert ckpt.all_steps() == [2, 4]  # resumed from 2, trained 3 and 4 again
  ckpt.close()


def test_checksums_catch_what_orbax_restores_silently(tmp_path):
  import json

  import jax
  import jax.numpy as jnp

  from lmjax.checkpoint import DamagedCheckpoint, state_checksums
  state = {"w": jnp.arange(12, dtype=jnp.float32).reshape(3, 4), "step": jnp.int32(3)}
  sums = state_checksums(state)
  flipped = {"w": state["w"].at[1, 2].set(jnp.float32(6.0000005)), "step": state["step"]}
  assert state_checksums(flipped)["['w']"] != sums["['w']"]  # one low bit
  ckpt = Checkpointer(str(tmp_path), async_save=False)
  ckpt.save(1, state, {"config": {}})
  meta_file = tmp_path / "checkpoints" / "1" / "meta" / "metadata"
  meta = json.loads(meta_file.read_text())
  assert meta["checksums"] == sums
  meta["checksums"]["['w']"] += 1  # as if the stored bytes had changed
  meta_file.write_text(json.dumps(meta))
  target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                        state)
  with pytest.raises(DamagedCheckpoint, match=r"checksum mismatch in \['w'\]"):
    ckpt.restore(1, target)
  ckpt.close()


def _digest(folder):
  import hashlib
  return {os.path.relpath(os.path.join(d, f), folder):
          hashlib.sha256(open(os.path.join(d, f), "rb").read()).hexdigest()
          for d, _, files in os.walk(folder) for f in files}


def test_disk_full_during_save_keeps_the_previous_checkpoint(tmp_path):
  """A file-size limit makes every large write fail as a full disk does (EFBIG instead of
  ENOSPC): the run exits with one line naming the intact step, and the next start
  resumes from it."""
  import resource
  import signal
  import subprocess
  import sys

  from tiny import ROOT, TINY_OVERRIDES
  values = dict(TINY_OVERRIDES, **{"data.cache_dir": str(tmp_path / "cache"),
                                   "runtime.compilation_cache_dir": str(tmp_path / "xla"),
                                   "train.checkpoint_every": 2})
  workdir = tmp_path / "run"
  args = [sys.executable, "-m", "launch.train", "--config=experiments/clm_tiny.py",
          f"--workdir={workdir}", *[f"--config.{k}={v}" for k, v in values.items()]]

  def full_disk():  # parameters alone are ~250 KB: no checkpoint fits in 100 KB files
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, 100_000))

  run = lambda steps, **kw: subprocess.run([*args, f"--config.train.steps={steps}"], cwd=ROOT,
                                           capture_output=True, text=True, timeout=300, **kw)
  assert run(2).returncode == 0
  before = _digest(workdir / "checkpoints" / "2")
  failed = run(4, preexec_fn=full_disk)
  assert failed.returncode == 2, failed.stderr[-3000:]
  last = failed.stderr.strip().splitlines()[-1]
  assert last.startswith("error: writing checkpoint step 4") and "(File too large)" in last
  assert "step 2 is intact" in last and "Traceback" not in failed.stderr
  assert _digest(workdir / "checkpoints" / "2") == before

  # The next start, in this process (only the failing one's exit status and line need a
  # launcher of their own): the same config as the launcher's flags.
  config = tiny_config("clm_tiny", tmp_path, train__steps=4, train__checkpoint_every=2,
                       runtime__compilation_cache_dir=str(tmp_path / "xla"))
  said = _train_saying(config, workdir, "info")
  assert f"resumed from {workdir / 'checkpoints'} step 2" in said, said
  assert sorted(os.listdir(workdir / "checkpoints")) == ["2", "4"]
  assert os.listdir(workdir / "checkpoints_damaged")[0].startswith("4.orbax-checkpoint-tmp")
