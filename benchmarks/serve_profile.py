"""Where a decode step's time goes under `launch.serve` (`python -m benchmarks.serve --profile`).

The engine and the server's event loop count their own time per phase (`GET /health`'s
`profile`, lmjax/inference/phases.py); this module takes the difference across a load and
prints it per decode step and per token, beside the CPU time of the server's threads and
of the benchmark's clients (all on the same cores). `device_steps` times the compiled
decode step alone at each batch size, and the sampler alone inside it.
"""

from __future__ import annotations

import os
import time
from typing import Any

import numpy as np

ENGINE = ("prepare", "dispatch", "device", "transfer", "emit", "admit", "prefill", "resize",
          "idle")


def process_cpu(pid: int) -> float:
  """User + system CPU seconds of process `pid` (all its threads)."""
  with open(f"/proc/{pid}/stat") as f:
    fields = f.read().rsplit(")", 1)[1].split()
  return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class Probe:
  """Snapshots taken before and after a load; `delta` is what the load cost."""

  def __init__(self, health: dict | None, server_pid: int | None):
    self.profile = health["profile"] if health else None
    self.server_cpu = process_cpu(server_pid) if server_pid else 0.0
    self.client_cpu = time.process_time()
    self.wall = time.perf_counter()


def delta(before: Probe, after: Probe, engine_only: dict | None = None) -> dict[str, Any]:
  """The per-phase figures of one load: from /health's profile (served) or from an engine's
  own `phases.snapshot()` pair (`engine_only`: {"before", "after"})."""
  if engine_only is not None:
    e0, e1, s0, s1 = engine_only["before"], engine_only["after"], None, None
  else:
    e0, e1 = before.profile["engine"], after.profile["engine"]
    s0, s1 = before.profile["server"], after.profile["server"]
  diff = lambda a, b, key: {k: b[key][k] - a[key][k] for k in b[key]}
  sec, cnt = diff(e0, e1, "seconds"), diff(e0, e1, "counts")
  out = {"wall_s": after.wall - before.wall, "engine_seconds": sec, "engine_counts": cnt,
         "engine_thread_cpu_s": e1["thread_cpu_s"] - e0["thread_cpu_s"],
         "client_cpu_s": after.client_cpu - before.client_cpu}
  if s0 is not None:
    out.update(server_seconds=diff(s0, s1, "seconds"), server_counts=diff(s0, s1, "counts"),
               loop_thread_cpu_s=s1["thread_cpu_s"] - s0["thread_cpu_s"],
               server_cpu_s=after.server_cpu - before.server_cpu)
  return out


def print_table(rows: list[tuple[str, dict]]) -> None:
  """One line per load: ms per dispatch for each engine phase, then us per token."""
  print("  per dispatch (ms; a dispatch runs `steps/disp` decode steps of `rows` rows):")
  print(f"    {'load':22s} {'rows':>5s} {'steps/disp':>10s} {'disp/s':>7s} " +
        " ".join(f"{p:>8s}" for p in ENGINE))
  for name, d in rows:
    c, s = d["engine_counts"], d["engine_seconds"]
    n = max(c["dispatches"], 1)
    print(f"    {name:22s} {c['row_steps'] / max(c['steps'], 1):5.1f} {c['steps'] / n:10.1f} "
          f"{n / d['wall_s']:7.1f} " + " ".join(f"{s[p] / n * 1e3:8.3f}" for p in ENGINE))
  print("  per token (us): engine thread CPU; the server's event loop: events waiting for it, "
        "detokenising, encoding chunks, its thread's CPU; the server process's CPU (all threads,"
        " XLA's included); the clients' CPU")
  print(f"    {'load':22s} {'tokens':>7s} {'eng cpu':>8s} {'q wait':>8s} {'detok':>8s} "
        f"{'encode':>8s} {'loop cpu':>8s} {'srv cpu':>8s} {'clients':>8s}")
  for name, d in rows:
    tokens = max(d["engine_counts"]["tokens"], 1)
    per = lambda x: f"{x / tokens * 1e6:8.0f}"
    if "server_seconds" in d:
      ss = d["server_seconds"]
      served = (per(ss["queue_wait"]) + " " + per(ss["detokenize"]) + " " + per(ss["encode"]) +
                " " + per(d["loop_thread_cpu_s"]) + " " + per(d["server_cpu_s"]))
    else:
      served = " ".join(f"{'-':>8s}" for _ in range(5))
    print(f"    {name:22s} {tokens:7d} {per(d['engine_thread_cpu_s'])} {served} "
          f"{per(d['client_cpu_s'])}")


def device_steps(source, rows_list: list[int], cache_len: int, repeats: int = 30
                 ) -> dict[int, dict[str, float]]:
  """Milliseconds of one decode step's forward pass (rows x 1 token against a cache of
  `cache_len`) and of the sampler with the log-probabilities, each compiled alone, at each
  batch size: the device's share of a step, without the host."""
  import jax
  import jax.numpy as jnp
  from lmjax.inference.decoder import Decoder, sample, step_keys, token_logprobs
  decoder = Decoder(source.model, source.params, "a decoder")
  params = jax.device_put(decoder.params)

  @jax.jit
  def forward(params, cache, tokens, positions):
    logits, cache = decoder.forward(params, cache, tokens, jnp.ones_like(tokens), positions)
    return logits[:, 0], cache

  @jax.jit
  def sampler(logits, keys, counters, temperature, top_p, top_k):
    tokens = sample(logits, step_keys(keys, counters), temperature, top_p, top_k)
    return token_logprobs(logits, tokens)
  out = {}
  for rows in rows_list:
    cache = decoder.init_cache(rows, cache_len)
    tokens = jnp.ones((rows, 1), jnp.int32)
    positions = jnp.full((rows, 1), cache_len // 2, jnp.int32)
    logits = jnp.asarray(np.random.default_rng(0).normal(size=(rows, decoder.cfg.vocab_size)),
                         jnp.float32)
    knobs = (jnp.zeros((rows, 2), jnp.uint32), jnp.zeros(rows, jnp.int32),
             jnp.ones(rows), jnp.ones(rows), jnp.zeros(rows, jnp.int32))
    run_forward = lambda: jax.block_until_ready(forward(params, cache, tokens, positions))
    run_sampler = lambda: jax.block_until_ready(sampler(logits, *knobs))
    run_forward(), run_sampler()  # compile
    out[rows] = {"forward_ms": _best(run_forward, repeats),
                 "sampler_ms": _best(run_sampler, repeats)}
  return out


def engine_steps(source, rows_list: list[int], cache_len: int, dispatches: int = 8
                 ) -> dict[int, float]:
  """Milliseconds per step of the engine's own decode program, every row of a `rows`-row
  cache decoding (temperature 1, `steps_per_dispatch` steps a dispatch, back to back, its
  inputs and records copied as when serving): what batching allows on this machine, with
  the least host work and none of the serving loop's. (A profile: it drives the engine's
  internals; the rows' cache indices run on past the cache, which costs the same.)"""
  from lmjax.inference.engine import Engine
  engine = Engine(source.model, source.params, pad=0, slots=max(rows_list), max_len=cache_len)
  steps, out = engine.steps_per_dispatch, {}
  for rows in rows_list:
    engine._init_state()
    engine._fit(rows)
    for i in range(rows):
      engine._table.start(i, 1, 2 ** 30, 1.0, 1.0, 0, i, (), logprobs=False)
    engine._run_decode(rows, steps)  # compile
    out[rows] = _best(lambda: engine._run_decode(rows, steps), dispatches) / steps
  return out


def _best(fn, repeats: int) -> float:
  times = []
  for _ in range(repeats):
    began = time.perf_counter()
    fn()
    times.append(time.perf_counter() - began)
  return float(np.min(times) * 1e3)


def ceilings(loads: list[dict], served: list[dict], device: dict[int, dict], n: int,
             cores: int) -> dict[str, float]:
  """What this machine allows the targets' ratios (n rows against one, n clients against
  one), measured: the device's own scaling (a step of the engine's decode program at n rows
  against one at 1 row, `engine_steps`: n rows cannot give more than n x t(1) / t(n) of one
  row's tokens/s) and the CPU that the n-client load spent per token, server and clients
  together on the same `cores` (n clients cannot get more tokens/s than the cores divided by
  that)."""
  out: dict[str, float] = {"n": n}
  if 1 in device and n in device:
    out["device_rows_x"] = n * device[1]["decode_ms"] / device[n]["decode_ms"]
  one = next((x for x in loads if x["clients"] == 1), None)
  for load, phases in zip(loads, served):
    if load["clients"] == n and one is not None:
      cpu = (phases["server_cpu_s"] + phases["client_cpu_s"]) / max(
          phases["engine_counts"]["tokens"], 1)
      out["cpu_us_per_token"] = cpu * 1e6
      out["cpu_clients_x"] = cores / cpu / one["tokens_per_s"]
  return out


def print_ceilings(limits: dict[str, float], cores: int) -> None:
  n = int(limits["n"])
  if "device_rows_x" in limits:
    print(f"  this machine's limits: the engine's decode program at {n} rows allows at most "
          f"{limits['device_rows_x']:.2f}x its tokens/s at one row", end="")
  if "cpu_clients_x" in limits:
    print(f"; the {n}-client load spent {limits['cpu_us_per_token']:.0f} us of CPU a token "
          f"(server and clients on {cores} cores): at most {limits['cpu_clients_x']:.2f}x one "
          f"client's tokens/s", end="")
  print()
