"""`benchmarks.serve --profile`: the engine's and the server's own accounting (GET /health's
`profile`) adds up to what the clients received, per load."""

import json
import subprocess
import sys

from tiny import ROOT


def test_the_profile_accounts_for_every_token(tmp_path):
  out = tmp_path / "serve.json"
  proc = subprocess.run([sys.executable, "-m", "benchmarks.serve", "--quick", "--profile",
                         "--cold=0", f"--json={out}"], cwd=ROOT, capture_output=True, text=True,
                        timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  result = json.loads(out.read_text())
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
  assert all(d["forward_ms"] > 0 and d["sampler_ms"] > 0 for d in profile["device"].values())
  assert "where the time goes" in proc.stdout and "per token (us)" in proc.stdout
