"""Run directories and token stores in a bucket, against a real S3 API served here (moto).

One ThreadedMotoServer serves this module; s3fs, boto3 (tensorboardX) and TensorStore
(orbax) reach it through AWS_ENDPOINT_URL, as they would reach AWS or any S3 API.
"""

import json
import os
import random
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from benchmarks.data_path import bucket_row, local_s3
from lmjax import paths
from lmjax import train as train_lib
from lmjax.checkpoint import COMMIT_FILE, Checkpointer
from lmjax.data import store
from lmjax.data.batches import PackedDataset
from lmjax.data.corpus import BUNDLED_DIR
from lmjax.data.prepare import PrepareConfig, prepare
from lmjax.errors import UserError
from lmjax.experiment import experiment_from_dict
from tiny import ROOT, TINY_OVERRIDES, tiny_config

TIMEOUT = 300
TOKENIZER = os.path.join(BUNDLED_DIR, "tokenizer.model")


@pytest.fixture(scope="module")
def s3():
  """An S3 endpoint on 127.0.0.1 and an s3fs client; the environment points everything at it."""
  import s3fs
  with local_s3("lmjax-test"):
    yield s3fs.S3FileSystem(skip_instance_cache=True)


def _bucket(fs, name):
  """A fresh prefix in the test bucket."""
  fs.rm(f"lmjax-test/{name}", recursive=True) if fs.exists(f"lmjax-test/{name}") else None
  return f"s3://lmjax-test/{name}"


def _train_command(tmp_path, workdir, **values):
  values = dict(TINY_OVERRIDES, **{"data.cache_dir": str(tmp_path / "cache"), **values})
  return [sys.executable, "-m", "launch.train", "--config=experiments/clm_tiny.py",
          f"--workdir={workdir}", *[f"--config.{k}={v}" for k, v in values.items()]]


def _run(command):
  proc = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=TIMEOUT)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return proc


def _steps(fs, url):
  """Committed steps in a bucket run's checkpoints/."""
  folder = url[5:] + "/checkpoints"
  names = [p.rsplit("/", 1)[1] for p in fs.ls(folder, refresh=True)] if fs.exists(folder) else []
  return sorted(int(n) for n in names if n.isdigit() and fs.exists(f"{folder}/{n}/{COMMIT_FILE}"))


def test_path_layer_behaves_alike_on_disk_and_in_a_bucket(s3, tmp_path):
  for root in (str(tmp_path / "local"), _bucket(s3, "layer")):
    paths.makedirs(paths.join(root, "a"))
    paths.write_atomic(paths.join(root, "a", "x.json"), '{"v": 1}')
    assert json.loads(paths.read_bytes(paths.join(root, "a", "x.json"))) == {"v": 1}
    log = paths.JsonlAppender(paths.join(root, "m.jsonl"), min_interval=3600)
    log.write("1\n")
    log.write("2\n")
    log.close()
    again = paths.JsonlAppender(paths.join(root, "m.jsonl"))  # appends to what is there
    again.write("3\n")
    again.close()
    assert paths.read_bytes(paths.join(root, "m.jsonl")) == b"1\n2\n3\n"
    paths.move(paths.join(root, "a"), paths.join(root, "b"))
    assert paths.listdir(root) == ["b", "m.jsonl"] and paths.isdir(paths.join(root, "b"))
    assert paths.listdir(paths.join(root, "b")) == ["x.json"]
    assert paths.getsize(paths.join(root, "b", "x.json")) == 8


def test_store_in_a_bucket_reads_byte_ranges_through_a_bounded_cache(s3, tmp_path, monkeypatch):
  inputs = (os.path.join(BUNDLED_DIR, "train.txt"),)
  local, remote = str(tmp_path / "store"), _bucket(s3, "store")
  for output in (local, remote):
    prepare(PrepareConfig(inputs=inputs, output=output, tokenizer=TOKENIZER, begin=2, end=3,
                          workers=1, split_mb=0.05), show_progress=False)
  assert paths.read_bytes(paths.join(remote, store.INDEX)) == open(
      os.path.join(local, store.INDEX), "rb").read()
  cache = paths.BlockCache(max_bytes=8 << 12, block_bytes=1 << 12)  # 8 blocks of 4 KiB
  monkeypatch.setattr(paths, "CACHE", cache)
  on_disk, in_bucket = (store.TokenStore.open(p) for p in (local, remote))
  assert type(in_bucket.shards[0]).__name__ == "_RemoteShard"
  a, b = (PackedDataset(store.TokenSource(s.shards), 32, seed=3) for s in (on_disk, in_bucket))
  for step in range(3):
    want, got = a.batch(step, 8), b.batch(step, 8)
    for key in want:
      np.testing.assert_array_equal(want[key], got[key])
  total = sum(paths.getsize(paths.join(remote, store.SHARDS, f"{s.name}.tokens"))
              for s in in_bucket.shards)
  assert cache.size_bytes <= cache.max_bytes
  assert 0 < cache.fetches * cache.block_bytes < total / 2  # ranges, not whole shards


def test_bucket_workdir_survives_kill_9_damage_and_sigterm(s3, tmp_path):
  """kill -9, then the same command: bitwise equal to an uninterrupted run. Then its newest
  step damaged and an unfinished one beside it: the next start sets both aside, resumes
  from the newest intact step, and a SIGTERM saves into the bucket. (One run for what
  were three tests, a subprocess start each saved.) Then launch.evaluate of the run."""
  steps = 16
  values = {"train.steps": steps, "train.checkpoint_every": 2, "train.log_every": 2}
  # The uninterrupted run, in this process (tests/test_kill.py does the same): the config
  # of _train_command's flags, on its single CPU device.
  straight = tmp_path / "straight"
  config = tiny_config("clm_tiny", tmp_path, **{k.replace(".", "__"): v for k, v in values.items()})
  train_lib.train_and_evaluate(experiment_from_dict(config.to_dict()), str(straight))
  url = _bucket(s3, "killed")
  # one kill here (tests/test_kill.py kills a local run three times): the bucket's part is
  # that an async save cut off mid-upload leaves no step that resume would take
  proc = subprocess.Popen(_train_command(tmp_path, url, **values), cwd=ROOT,
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                          start_new_session=True)
  deadline = time.monotonic() + TIMEOUT
  while not _steps(s3, url) and proc.poll() is None:
    assert time.monotonic() < deadline, "no checkpoint reached the bucket"
    time.sleep(0.1)
  time.sleep(random.Random(0).uniform(0.0, 1.0))  # training or in the middle of an async save
  assert proc.poll() is None, "the run ended before it could be killed"
  os.killpg(proc.pid, signal.SIGKILL)
  proc.wait(timeout=60)
  final = _run(_train_command(tmp_path, url, **values))
  assert "resumed from s3://lmjax-test/killed/checkpoints" in final.stderr
  folder = "lmjax-test/killed/checkpoints"
  for name in (p.rsplit("/", 1)[1] for p in s3.ls(folder, refresh=True)):
    assert name.isdigit() and s3.exists(f"{folder}/{name}/{COMMIT_FILE}"), name
  a, b = Checkpointer(str(straight), async_save=False), Checkpointer(url, async_save=False)
  sa, sb = a.restore_arrays(steps), b.restore_arrays(steps)
  a.close()
  b.close()
  jax.tree.map(np.testing.assert_array_equal, sa, sb)  # params, optimizer state, step, rng
  lines = s3.cat_file("lmjax-test/killed/metrics.jsonl").decode().splitlines()
  assert json.loads(lines[-1])["step"] == steps
  assert s3.find("lmjax-test/killed/tensorboard") and s3.exists("lmjax-test/killed/tokenizer.model")
  saved = _damage_then_sigterm(s3, tmp_path, url, steps, len(lines))
  # launch.evaluate of a run in a bucket (this one: a checkpoint one process wrote; a
  # two-process run's checkpoint does not restore on one device, see the test below)
  evaluated = subprocess.run([sys.executable, "-m", "launch.evaluate", f"--workdir={url}",
                              "--data", os.path.join(BUNDLED_DIR, "valid.txt"),
                              "--max_batches=1", "--seq_len=32"],
                             cwd=ROOT, capture_output=True, text=True, timeout=TIMEOUT)
  assert evaluated.returncode == 0, evaluated.stderr[-2000:]
  result = json.loads(s3.cat_file("lmjax-test/killed/evaluation.json"))
  assert result["model"] == f"{url} step {saved}" and result["loss"] > 0


def _damage_then_sigterm(s3, tmp_path, url, newest, lines):
  """Flipped bytes in step `newest`, an uncommitted step after it; then a long run that
  must set both aside, resume from the step before, and save where a SIGTERM stops it."""
  before = _aside(s3, url)
  data = [p for p in s3.find(f"{url[5:]}/checkpoints/{newest}/state") if "/d/" in p]
  biggest = max(data, key=s3.size)
  raw = bytearray(s3.cat_file(biggest))
  raw[len(raw) // 2:len(raw) // 2 + 64] = bytes(b ^ 0xFF for b in raw[len(raw) // 2:][:64])
  s3.pipe_file(biggest, bytes(raw))
  s3.pipe_file(f"{url[5:]}/checkpoints/{newest + 2}/state/_METADATA", b"{}")  # no commit file
  proc = subprocess.Popen(_train_command(tmp_path, url, **{
      "train.steps": 100000, "train.log_every": 2, "train.checkpoint_every": 100000}),
      cwd=ROOT, stderr=subprocess.PIPE, text=True)
  metrics, deadline = url[5:] + "/metrics.jsonl", time.monotonic() + TIMEOUT
  while len(s3.cat_file(metrics).splitlines()) <= lines:  # its first line: it is training
    assert proc.poll() is None and time.monotonic() < deadline, "training did not start"
    time.sleep(0.2)
  proc.send_signal(signal.SIGTERM)
  _, stderr = proc.communicate(timeout=120)
  assert proc.returncode == 0 and "preempted" in stderr, stderr[-2000:]
  assert f"resumed from {url}/checkpoints step {newest - 2}" in stderr
  aside = sorted(set(_aside(s3, url)) - set(before))  # the kill may have set aside a step too
  assert sorted(n.split(".")[0] for n in aside) == [str(newest), str(newest + 2)], aside
  saved = [s for s in _steps(s3, url) if s > newest - 2]
  assert len(saved) == 1 and saved[0] >= newest, saved  # the SIGTERM's step, saved in the bucket
  records = s3.cat_file(metrics).decode().splitlines()
  assert json.loads(records[-1])["step"] <= saved[0]
  return saved[0]


def _aside(s3, url):
  folder = url[5:] + "/checkpoints_damaged"
  return [p.rsplit("/", 1)[1] for p in s3.ls(folder, refresh=True)] if s3.exists(folder) else []


def test_two_processes_train_from_a_store_in_a_bucket_workdir(s3, tmp_path):
  """A store prepared into the bucket, two processes training from it into a bucket run,
  then both resuming it. (One run for what were two tests; launch.evaluate of a bucket run
  is checked at the end of the kill -9 test above.)"""
  store_url, url = _bucket(s3, "prepared"), _bucket(s3, "multi")
  proc = subprocess.run([sys.executable, "-m", "launch.prepare_data", "--input",
                         os.path.join(BUNDLED_DIR, "train.txt"), f"--tokenizer={TOKENIZER}",
                         f"--output={store_url}", "--workers=2", "--split_mb=0.1"],
                        cwd=ROOT, capture_output=True, text=True, timeout=TIMEOUT)
  assert proc.returncode == 0, proc.stderr[-2000:]
  index = json.loads(s3.cat_file("lmjax-test/prepared/index.json"))
  assert len(index["shards"]) > 1
  s3.put_file(TOKENIZER, "lmjax-test/prepared/tok.model")  # the tokenizer in the bucket too
  local = [sys.executable, "-m", "launch.local", "--num_processes=2", "--devices_per_process=2",
           "--"]
  values = {"train.steps": 4, "train.checkpoint_every": 2, "train.log_every": 2,
            "data.train_files": store_url, "data.eval_files": store_url,
            "data.tokenizer": f"{store_url}/tok.model"}
  first = _run([*local, *_train_command(tmp_path, url, **values)[3:]])
  assert "process 1 of 2" in first.stderr and "step 4/4" in first.stderr
  assert _steps(s3, url) == [2, 4]
  second = _run([*local, *_train_command(tmp_path, url, **{**values, "train.steps": 6})[3:]])
  assert "resumed from s3://lmjax-test/multi/checkpoints step 4" in second.stderr
  assert _steps(s3, url) == [2, 4, 6]
  records = [json.loads(line) for line in s3.cat_file("lmjax-test/multi/metrics.jsonl").splitlines()]
  assert [r["step"] for r in records if r["split"] == "train"] == [2, 4, 6]
  assert not os.path.exists(tmp_path / "cache")  # nothing was tokenized again


@pytest.mark.parametrize("workdir, env, says", [
    ("s3://Bad_Bucket!/run", {}, "invalid bucket name"),
    ("s3://no-such-bucket/run", {}, "check the bucket name"),
    ("s3://lmjax-test/nocreds", {"AWS_ACCESS_KEY_ID": None, "AWS_SECRET_ACCESS_KEY": None,
                                 "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent",
                                 "AWS_CONFIG_FILE": "/nonexistent"}, "no credentials found"),
])
def test_bad_bucket_or_missing_credentials_is_one_line(s3, tmp_path, workdir, env, says):
  child = dict(os.environ)
  for key, value in env.items():
    child.pop(key, None) if value is None else child.__setitem__(key, value)
  for command in (_train_command(tmp_path, workdir, **{"train.steps": 2}),
                  [sys.executable, "-m", "launch.prepare_data", "--input",
                   os.path.join(BUNDLED_DIR, "valid.txt"), f"--tokenizer={TOKENIZER}",
                   f"--output={workdir}"]):
    proc = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=TIMEOUT,
                          env=child)
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and says in errors[0], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr


def test_data_path_benchmark_bucket_row(s3, tmp_path):
  exp = experiment_from_dict(tiny_config("clm_tiny", tmp_path).to_dict())
  row = bucket_row(exp, batches=3)
  for where in ("disk", "s3"):
    assert row[f"reader_{where}_tokens_per_s"] > 0
    assert 0 < row[f"save_{where}_s"] < 60 and 0 < row[f"restore_{where}_s"] < 60


def test_bucket_urls_reach_their_filesystems_and_tensorstore_drivers(s3):
  from orbax.checkpoint._src.path import gcs_utils
  from orbax.checkpoint._src.serialization import tensorstore_utils as tsu
  from lmjax.checkpoint import _teach_orbax_s3
  _teach_orbax_s3()
  import gcsfs
  assert isinstance(paths.filesystem("gs://some-bucket/run")[0], gcsfs.GCSFileSystem)
  assert type(paths.filesystem("s3://some-bucket/run")[0]).__name__ == "S3FileSystem"
  assert tsu._normalize_path("s3://b/run/./x/") == "s3://b/run/x"
  assert tsu._normalize_path("gs://b/run/x/") == "gs://b/run/x"
  assert gcs_utils.get_kvstore_for_gcs("gs://b/run/x") == {"driver": "gcs", "bucket": "b",
                                                            "path": "run/x"}
  spec = gcs_utils.get_kvstore_for_gcs("s3://b/run/x")
  assert spec == {"driver": "s3", "bucket": "b", "path": "run/x",
                  "endpoint": os.environ["AWS_ENDPOINT_URL"], "aws_region": "us-east-1"}
  with pytest.raises(UserError, match="no filesystem for nosuchscheme://"):
    paths.filesystem("nosuchscheme://b/x")


def test_sweep_summary_in_a_bucket(s3):
  from lmjax.sweep import Trial
  from lmjax.sweep.report import read_trial_metrics, write_summary
  url = _bucket(s3, "sweep")
  trials = [Trial("000_lr=0.1", {"optimizer.learning_rate": 0.1}),
            Trial("001_lr=0.01", {"optimizer.learning_rate": 0.01})]
  for trial, loss in zip(trials, (2.5, 2.0)):
    lines = [{"step": 10, "split": "train", "loss": 3.0, "tokens_per_s": 100.0},
             {"step": 10, "split": "eval", "loss": loss}]
    s3.pipe_file(f"lmjax-test/sweep/{trial.name}/metrics.jsonl",
                 "".join(json.dumps(r) + "\n" for r in lines).encode())
  rows = write_summary(url, trials)
  assert [r["trial"] for r in rows] == ["001_lr=0.01", "000_lr=0.1"]
  assert read_trial_metrics(paths.join(url, trials[1].name))["best"] == 2.0
  for name in ("summary.csv", "summary.md", "loss_curves.png"):
    assert s3.size(f"lmjax-test/sweep/{name}") > 0
  assert "| 1 | 001_lr=0.01 |" in s3.cat_file("lmjax-test/sweep/summary.md").decode()


def test_run_lock_in_a_bucket(s3):
  """A sweep in a bucket locks its trial directories there too (advisory: no atomic
  create on an object store, so written and read back)."""
  from lmjax.run_lock import RunDirBusy, RunLock, holder
  url = _bucket(s3, "locked")
  with RunLock(url, heartbeat_s=0.2, grace_s=5):
    assert holder(url, 5)["pid"] == os.getpid()
    with pytest.raises(RunDirBusy, match="held by another run"):
      RunLock(url, heartbeat_s=0.2, grace_s=5).acquire()
  assert holder(url, 5) is None and not s3.exists("lmjax-test/locked/run.lock")
