"""The accelerator benchmark script runs end to end at toy size on CPU, so it is known to work
before a GPU is at hand."""

import json
import os
import subprocess
import sys

import pytest

from tiny import ROOT


def test_gpu_benchmark_runs_tiny_on_cpu(tmp_path):
  out = tmp_path / "gpu.json"
  proc = subprocess.run([sys.executable, "-m", "benchmarks.gpu", "--tiny", "--batches=2",
                         "--remat=none,full", "--steps=1", f"--json={out}"], cwd=ROOT,
                        capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert proc.stdout.count("MFU") == 3 and "of the bandwidth bound" in proc.stdout
  result = json.loads(out.read_text())
  assert len(result["sweep"]) == 2 and all(r["tokens_per_s"] > 0 for r in result["sweep"])
  assert 0 < result["best"]["mfu"] < 1 and result["decode"]["tokens_per_s"] > 0


@pytest.fixture(scope="module")
def suite(tmp_path_factory):
  """One `benchmarks.run --quick` process for the suite's tests: limits, clm_tiny as shipped
  against PyTorch, and the FLOP check (a process of its own each would import and warm up
  jax and torch again)."""
  out = tmp_path_factory.mktemp("suite") / "bench.json"
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # the tests' -O0 flags
  # --smoke: clm_tiny (as shipped, batch 32) timed for one step, not 5 x 2 after a warm-up
  proc = subprocess.run([sys.executable, "-m", "benchmarks.run", "--quick", "--smoke",
                         "--sections=limits,tiny,flops", f"--json={out}"], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=900)  # two tests' worth
  assert proc.returncode == 0, proc.stderr[-3000:]
  return proc.stdout, json.loads(out.read_text())


def test_benchmark_suite_limits_and_flop_check(suite):
  stdout, result = suite
  limits = result["limits"]
  assert limits["matmul_f32_flops"] > 1e9 and limits["read_bytes_per_s"] > 1e8
  # In place (donated): a freshly allocated output times page faults, 0.2x the read rate here.
  assert limits["copy_bytes_per_s"] > limits["read_bytes_per_s"] / 2
  flops = [t for t in result["targets"] if "FLOP formula" in t["target"]]
  assert [t["met"] for t in flops] == [True, True], result["targets"]
  assert "clm FLOP formula within 2%" in stdout


def test_benchmark_suite_times_clm_tiny_as_shipped_against_pytorch(suite):
  _, result = suite
  steps = result["tiny"]["step_s"]
  assert steps["lmjax"] > 0 and steps["torch_f32"] > 0
  assert result["tiny"]["ratio"] == steps["lmjax"] / steps["torch_f32"]
  assert result["tiny"]["dtype"] == "float32"  # the suite's LMJAX_CPU_DTYPE, passed on
  others = [t["target"] for t in result["targets"] if "FLOP formula" not in t["target"]]
  assert others == ["clm_tiny step <= PyTorch f32"]


def test_data_prep_benchmark_runs_small(tmp_path):
  out = tmp_path / "prep.json"
  proc = subprocess.run([sys.executable, "-m", "benchmarks.data_prep", "--sizes_mb=2,4",
                         "--noray", f"--json={out}", f"--workdir={tmp_path / 'work'}"], cwd=ROOT,
                        capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  result = json.loads(out.read_text())
  assert result["stores_identical"] and result["local_2_workers"]["tokens"] > 5e5
  assert result["reader_simulated"]["windows"] == 10**10
  assert result["reader_store"]["batch_ms"] > 0 and "targets" in proc.stdout


def test_flax_peer_builds_from_the_running_environment(tmp_path):
  """The peer sees this interpreter's jax and flax (a fresh venv in CI), not the base
  Python's; a peer environment whose link to this one broke is repaired, not reused."""
  from benchmarks import flax_peer
  python = flax_peer.ensure_venv()
  assert flax_peer._works(python)
  peer = flax_peer.FlaxPeer()
  try:
    peer.build("clm", d_model=32, layers=1, seq_len=16, batch=2, vocab=128, steps=2)
    assert 0 < peer.run() < 60
  finally:
    peer.close()
  site = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                        capture_output=True, text=True, check=True).stdout.strip()
  os.remove(os.path.join(site, "lmjax_parent.pth"))  # break it: jax is no longer importable
  assert not flax_peer._works(python)
  assert flax_peer._works(flax_peer.ensure_venv())  # repaired


# benchmarks.serve end to end (test_serve_benchmark_runs_small) lives in
# tests/test_serve_profile.py, on the one --profile run that file's tests share.
