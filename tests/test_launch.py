"""The launchers as a user runs them: subprocesses, exit codes, one-line errors."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from tiny import ROOT, TINY_OVERRIDES

TIMEOUT = 240


def launch(module, *args, cwd=ROOT):
  return subprocess.run([sys.executable, "-m", module, *args], cwd=cwd, capture_output=True,
                        text=True, timeout=TIMEOUT)


def tiny_flags(tmp_path, **extra):
  values = dict(TINY_OVERRIDES, **{"data.cache_dir": str(tmp_path / "cache")}, **extra)
  return [f"--config.{k}={v}" for k, v in values.items()]


@pytest.mark.parametrize("name", ["clm_tiny", "mlm_tiny"])
def test_tiny_experiment_trains_through_the_launcher(tmp_path, name):
  workdir = tmp_path / "run"
  cache = tmp_path / "xla_cache"
  proc = launch("launch.train", f"--config=experiments/{name}.py", f"--workdir={workdir}",
                *tiny_flags(tmp_path, **{"train.steps": 40, "train.eval_every": 20,
                                         "optimizer.learning_rate": 0.005,
                                         "runtime.compilation_cache_dir": str(cache)}))
  assert proc.returncode == 0, proc.stderr[-3000:]
  records = [json.loads(line) for line in open(workdir / "metrics.jsonl")]
  train = [r for r in records if r["split"] == "train"]
  evals = [r for r in records if r["split"] == "eval"]
  assert [r["step"] for r in evals] == [20, 40]
  assert train[-1]["loss"] < train[0]["loss"] - 1.0, train
  assert evals[-1]["loss"] < evals[0]["loss"]
  for key in ("learning_rate", "grad_norm", "tokens_per_s", "mfu", "accuracy"):
    assert key in train[-1]
  assert "step 40/40" in proc.stderr and "tok/s" in proc.stderr and "MFU" in proc.stderr
  assert os.listdir(workdir / "tensorboard")
  assert sorted(os.listdir(workdir / "checkpoints")) == ["10", "20", "30", "40"][-3:]
  assert (workdir / "tokenizer.model").is_file()
  assert os.listdir(cache)  # the persistent compilation cache was written


_TENSORBOARD_CHECK = """
import glob, struct, sys
from lmjax.metrics import MetricsWriter
writer = MetricsWriter(sys.argv[1])
writer.write(3, "train", {"loss": 2.5})
writer.close()
assert "torch" not in sys.modules, "tensorboardX pulled torch in"
from tensorboardX.proto import event_pb2
data, at, seen = open(glob.glob(sys.argv[1] + "/tensorboard/events*")[0], "rb").read(), 0, {}
while at < len(data):  # TFRecord: length, its crc, the Event, its crc
  (size,) = struct.unpack("<Q", data[at:at + 8])
  event = event_pb2.Event.FromString(data[at + 12:at + 12 + size])
  seen.update({(v.tag, event.step): v.simple_value for v in event.summary.value})
  at += 16 + size
print(seen)
assert seen == {("train/loss", 3): 2.5}, seen
"""


def test_metrics_reach_tensorboard_without_importing_torch(tmp_path):
  """torch is installed here (test extras); starting a run must not pay for importing it."""
  import importlib.util
  assert importlib.util.find_spec("torch") is not None
  proc = subprocess.run([sys.executable, "-c", _TENSORBOARD_CHECK, str(tmp_path)], cwd=ROOT,
                        capture_output=True, text=True, timeout=TIMEOUT)
  assert proc.returncode == 0, proc.stderr[-2000:]


def test_mistyped_override_names_the_key(tmp_path):
  proc = launch("launch.train", "--config=experiments/clm_tiny.py", f"--workdir={tmp_path}",
                "--config.optimizer.lrr=1")
  assert proc.returncode != 0
  lines = [line for line in proc.stderr.splitlines() if line.strip()]
  assert len(lines) == 1 and "lrr" in lines[0], proc.stderr
  assert not os.listdir(tmp_path)


@pytest.mark.parametrize("flag,message", [
    ("--config.data.seq_len=4096", "exceeds model.max_len"),
    ("--config.train.batch_size=7", "not divisible by train.grad_accum_steps"),
    ("--config.data.train_files=('missing.txt',)", "train file not found: missing.txt"),
    ("--config.data.tokenizer=missing.model", "tokenizer file not found"),
])
def test_bad_input_is_one_line_and_nonzero(tmp_path, flag, message):
  extra = ["--config.train.grad_accum_steps=2"] if "batch_size" in flag else []
  proc = launch("launch.train", "--config=experiments/clm_tiny.py",
                f"--workdir={tmp_path / 'run'}", flag, *extra)
  assert proc.returncode == 2, proc.stderr[-2000:]
  assert proc.stderr.strip().splitlines()[-1].startswith("error: ")
  assert message in proc.stderr and "Traceback" not in proc.stderr


def test_train_tokenizer_launcher(tmp_path):
  out = tmp_path / "tok.model"
  proc = launch("launch.train_tokenizer", "--input=lmjax/assets/shakespeare/valid.txt",
                f"--output={out}", "--vocab_size=500", "--model_type=bpe")
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert out.is_file() and "500 pieces" in proc.stdout
  proc = launch("launch.train_tokenizer", "--input=nope.txt", f"--output={out}")
  assert proc.returncode == 2 and "input file not found: nope.txt" in proc.stderr


def _train_until_signalled(tmp_path, workdir, sig, lines):
  """launch.train of clm_tiny for 100000 steps, sent `sig` once metrics.jsonl holds `lines`
  lines: it must exit 0 within 30 s, saying it was preempted. Returns its stderr."""
  flags = tiny_flags(tmp_path, **{"train.steps": 100000, "train.log_every": 2,
                                  "train.checkpoint_every": 100000})
  proc = subprocess.Popen([sys.executable, "-m", "launch.train", "--config=experiments/clm_tiny.py",
                           f"--workdir={workdir}", *flags], cwd=ROOT, stderr=subprocess.PIPE,
                          text=True)
  metrics = workdir / "metrics.jsonl"
  deadline = time.monotonic() + TIMEOUT
  while not (metrics.exists() and metrics.read_text().count("\n") >= lines):
    assert proc.poll() is None and time.monotonic() < deadline, "training did not start"
    time.sleep(0.2)
  sent = time.monotonic()
  proc.send_signal(sig)
  _, stderr = proc.communicate(timeout=60)
  assert proc.returncode == 0, stderr[-2000:]
  assert time.monotonic() - sent < 30 and "preempted" in stderr
  return stderr


def test_signal_saves_the_current_step_and_exits_zero(tmp_path):
  """SIGTERM, then SIGINT to the run that resumes: each saves the step it stopped at."""
  workdir = tmp_path / "run"
  checkpoints = lambda: sorted(int(p.name) for p in (workdir / "checkpoints").iterdir())
  _train_until_signalled(tmp_path, workdir, signal.SIGTERM, 2)
  saved = checkpoints()
  assert len(saved) == 1 and saved[0] >= 4
  lines = (workdir / "metrics.jsonl").read_text().count("\n")
  stderr = _train_until_signalled(tmp_path, workdir, signal.SIGINT, lines + 2)
  assert f"step {saved[0]}" in stderr  # it resumed from the SIGTERM's checkpoint
  later = checkpoints()
  assert len(later) == 2 and later[0] == saved[0] and later[1] >= saved[0] + 4
  again = launch("launch.train", "--config=experiments/clm_tiny.py", f"--workdir={workdir}",
                 *tiny_flags(tmp_path, **{"train.steps": later[1] + 2}))
  assert again.returncode == 0 and f"step {later[1]}" in again.stderr
  assert checkpoints()[-1] == later[1] + 2
