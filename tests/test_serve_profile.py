"""`benchmarks.serve` end to end at toy size, and `--profile`: the engine's and the server's own
accounting (GET /health's `profile`) adds up to what the clients received, per load."""

import json
import os
import subprocess
import sys

import pytest

from tiny import ROOT


@pytest.fixture(scope="module")
def served(tmp_path_factory):
  """One `benchmarks.serve --quick --profile` run for both tests (the profile rides along on
  the same loads; a run each cost a second model export, server and warm-up)."""
  out = tmp_path_factory.mktemp("serve") / "serve.json"
  proc = subprocess.run([sys.executable, "-m", "benchmarks.serve", "--quick", "--profile",
                         f"--json={out}"], cwd=ROOT, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return proc.stdout, json.loads(out.read_text())


def test_serve_benchmark_runs_small(served):
  """benchmarks.serve end to end at toy size: server loads, the engine alone, the generate
  loop and a cold launch.generate process, figures consistent with each other."""
  stdout, result = served
  loads = result["loads"]
  assert [x["clients"] for x in loads] == [1, 4]
  for x in loads:  # 2 requests a client, 8 tokens each unless a sample hit end-of-text
    assert x["requests"] == 2 * x["clients"] and 0 < x["tokens"] <= 8 * x["requests"]
    assert 0 < x["ttft_ms_p50"] <= x["ttft_ms_p99"] <= x["latency_ms_p99"]
  assert result["generate_loop"]["requests"] == 8 and result["generate_loop"]["tokens"] > 0
  assert result["cold_generate_s"] > 0 and set(result["engine_alone_tokens_per_s"]) == {"1", "4"}
  # 2 layers x (keys + values) x 24 positions (16 + 8, one chunk of 24) x 64 wide x float32
  assert result["kv_cache_bytes_per_row"] >= 2 * 2 * 24 * 64 * 4
  assert result["health"]["busy_rows"] == 0 and "x 1 client" in stdout


def test_the_profile_accounts_for_every_token(served):
  stdout, result = served
  profile = result["profile"]
  for load, phases in zip(result["loads"], profile["served"]):
    counts = phases["engine_counts"]
    assert counts["tokens"] == load["tokens"] > 0  # every token the clients were sent
    assert counts["row_steps"] >= counts["tokens"]  # a drawn stop id is a row step, no token
    assert counts["steps"] >= counts["dispatches"] > 0 and counts["chunks"] >= load["requests"]
    assert phases["server_counts"]["events"] >= load["tokens"] + load["requests"]  # + "done"
    assert 0 < phases["server_counts"]["chunks"] <= load["tokens"] + load["requests"]
    assert sum(phases["engine_seconds"].values()) <= phases["wall_s"] + 0.6  # an idle wait: 0.5 s
    assert all(v >= 0 for v in phases["engine_seconds"].values())
  for rows, phases in profile["engine_alone"].items():
    assert phases["engine_counts"]["tokens"] == int(rows) * 8  # greedy, 8 tokens each
  assert set(profile["device"]) == {"1", "4"}
  assert all(d["forward_ms"] > 0 and d["sampler_ms"] > 0 and d["decode_ms"] > 0
             for d in profile["device"].values())
  assert "where the time goes" in stdout and "per token (us)" in stdout
  # the machine's limits for the ratios (4 clients here, 8 in a full run), from those figures
  limits, step = profile["limits"], {int(k): d["decode_ms"] for k, d in profile["device"].items()}
  assert limits["n"] == 4 and limits["device_rows_x"] == pytest.approx(4 * step[1] / step[4])
  four = profile["served"][1]
  cpu = (four["server_cpu_s"] + four["client_cpu_s"]) / four["engine_counts"]["tokens"]
  assert limits["cpu_us_per_token"] == pytest.approx(cpu * 1e6)
  assert limits["cpu_clients_x"] == pytest.approx(
      os.cpu_count() / cpu / result["loads"][0]["tokens_per_s"])
  assert "this machine's limits" in stdout
