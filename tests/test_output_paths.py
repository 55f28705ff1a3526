"""`--output` of launch.lm_eval and launch.evaluate (launch.cli.output_path): any path, local
or in a bucket; a bare file name inside an lmjax run, or in the current directory for a
Hugging Face model directory; a place that cannot be written fails before evaluating."""

import json
import os
import subprocess
import sys

import pytest

from benchmarks.data_path import local_s3
from launch.cli import output_path
from lmjax import paths
from lmjax.data import BUNDLED_DIR
from lmjax.errors import UserError
from tiny import ROOT

VALID = os.path.join(BUNDLED_DIR, "valid.txt")
BUCKET = "lmjax-outputs"


@pytest.fixture(scope="module")
def s3():
  """test_object_storage's moto S3 server (local_s3), and an s3fs client. Another module's
  server may run in this process before or after this one: moto's buckets outlive a
  server (so this bucket has a name of its own), and s3fs caches its filesystem objects
  with the endpoint they were made for (so the cache is emptied on both sides)."""
  import s3fs
  s3fs.S3FileSystem.clear_instance_cache()
  try:
    with local_s3(BUCKET):
      yield s3fs.S3FileSystem(skip_instance_cache=True)
  finally:
    s3fs.S3FileSystem.clear_instance_cache()


@pytest.fixture
def dirs(tmp_path, monkeypatch):
  """(an lmjax run, a Hugging Face directory, the current directory), as far as
  output_path tells them apart."""
  run, hf, cwd = tmp_path / "run", tmp_path / "hf", tmp_path / "cwd"
  for d in (run / "checkpoints", hf, cwd):
    d.mkdir(parents=True)
  (hf / "config.json").write_text("{}")
  monkeypatch.chdir(cwd)
  return run, hf, cwd


def test_a_bare_name_goes_into_a_run_but_not_into_a_hugging_face_directory(dirs):
  run, hf, cwd = dirs
  assert output_path(str(run), "lme.json") == str(run / "lme.json")
  assert output_path(str(hf), "lme.json") == str(cwd / "lme.json")
  assert os.listdir(hf) == ["config.json"] and os.listdir(cwd) == []  # the probe is gone


def test_any_other_path_is_taken_as_given_and_its_directory_made(dirs, tmp_path):
  run, hf, cwd = dirs
  for workdir in (run, hf):
    assert output_path(str(workdir), "results/lme.json") == str(cwd / "results" / "lme.json")
    assert output_path(str(workdir), "../escape.json") == str(tmp_path / "escape.json")
    deep = tmp_path / "a" / "b" / "c.json"
    assert output_path(str(workdir), str(deep)) == str(deep)
  assert (cwd / "results").is_dir() and (tmp_path / "a" / "b").is_dir()
  assert os.listdir(cwd / "results") == []


@pytest.mark.parametrize("name,says", [
    ("blocker/x.json", "cannot write in"),  # its directory would be a file
    ("blocker/sub/x.json", "cannot write in"),
    ("./results", "is a directory"), ("checkpoints", "is a directory"),  # the run's own
    ("", "must name a file"), (".", "must name a file"), ("out/", "must name a file"),
])
def test_a_place_that_cannot_be_written_is_one_line(dirs, name, says):
  run, _, cwd = dirs
  (cwd / "blocker").write_text("a file")
  (cwd / "results").mkdir()
  with pytest.raises(UserError, match=says):
    output_path(str(run), name)


def test_a_missing_workdir_is_left_to_the_loader(tmp_path):
  assert output_path(str(tmp_path / "nope"), "x.json") == str(tmp_path / "nope" / "x.json")
  assert not (tmp_path / "nope").exists()  # nothing created for a run that is not there


def test_bucket_outputs(s3, dirs):
  run, hf, _ = dirs
  url = f"s3://{BUCKET}/outputs/lme.json"
  assert output_path(str(hf), url) == url
  assert s3.find(f"{BUCKET}/outputs") == []  # the probe is gone, nothing written
  with pytest.raises(UserError, match="check the bucket name"):
    output_path(str(run), "s3://no-such-bucket/lme.json")


def _launch(module, *args, cwd):
  env = dict(os.environ, PYTHONPATH=ROOT)
  return subprocess.run([sys.executable, "-m", module, *args], cwd=cwd, capture_output=True,
                        text=True, timeout=300, env=env)


def test_evaluate_writes_a_hugging_face_models_results_beside_not_inside(tiny_runs, tmp_path):
  """launch.evaluate on a Hugging Face directory: the bare default name lands in the current
  directory, a bucket URL in the bucket; an unwritable place fails before evaluating."""
  hf = tiny_runs / "gpt2"
  before = sorted(os.listdir(hf))
  proc = _launch("launch.evaluate", f"--workdir={hf}", f"--data={VALID}", "--max_batches=1",
                 "--seq_len=32", cwd=tmp_path)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert json.loads((tmp_path / "evaluation.json").read_text()) == json.loads(proc.stdout)
  assert sorted(os.listdir(hf)) == before
  (tmp_path / "blocker").write_text("a file")
  bad = _launch("launch.evaluate", f"--workdir={hf}", f"--data={VALID}",
                "--output=blocker/evaluation.json", cwd=tmp_path)
  assert bad.returncode == 2 and "computes in" not in bad.stderr  # the model was not loaded
  assert bad.stderr.strip().splitlines()[-1].startswith("error: --output=blocker/evaluation.json")


def test_evaluate_writes_into_a_bucket(s3, tiny_runs, tmp_path):
  url = f"s3://{BUCKET}/evaluations/clm_tiny.json"
  proc = _launch("launch.evaluate", f"--workdir={tiny_runs / 'clm_tiny'}", f"--data={VALID}",
                 "--max_batches=1", "--seq_len=32", f"--output={url}", cwd=tmp_path)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert json.loads(paths.read_bytes(url)) == json.loads(proc.stdout)
  bad = _launch("launch.evaluate", f"--workdir={tiny_runs / 'clm_tiny'}", f"--data={VALID}",
                "--output=s3://no-such-bucket/e.json", cwd=tmp_path)
  assert bad.returncode == 2 and "computes in" not in bad.stderr
  errors = [line for line in bad.stderr.splitlines() if line.startswith("error:")]
  assert len(errors) == 1 and "check the bucket name" in errors[0]
