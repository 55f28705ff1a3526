"""The accelerator benchmark script runs end to end at toy size on CPU, so it is known to work
before a GPU is at hand."""

import json
import subprocess
import sys

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
