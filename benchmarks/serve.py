"""Serving under load: launch.serve with 1, 8 and 32 concurrent clients, against one client
alone and against launch.generate in a loop, in one run.

  python -m benchmarks.serve [--workdir RUN_OR_HF_DIR] [--clients 1,8,32] [--requests 4]
      [--max_tokens 64] [--prompt_tokens 32] [--max_batch 32] [--repeats 1] [--profile]
      [--quick] [--json OUT]

Without --workdir a GPT-2-shaped model (--d_model, --layers, the bundled tokenizer) is
initialised at random and exported: throughput does not depend on the weights. Each client
sends --requests streamed completions one after another (prompts: windows of the bundled
validation text, as token ids; sampled at temperature 1 with a seed); a request's tokens
are its usage.completion_tokens, its time to first token the arrival of its first text.
Reported per load: total tokens/s and its ratio to one client's (target: 8 clients >= 4x),
TTFT and request latency p50/p99; the KV cache per row from /health. The baseline runs
the 8-client load's requests one at a time through lmjax's Generator, compiled and warm
(`launch.generate` in a loop without the process start), and times a few cold
`python -m launch.generate` processes (what a script calling it per request pays).
`--profile` adds where the time goes (benchmarks/serve_profile.py); `--repeats N` runs
every load and the engine alone N times, interleaved, for a machine shared with other work.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np
from absl import app, flags

from launch.cli import cli_main

flags.DEFINE_string("workdir", None, "a decoder run or Hugging Face directory (default: random)")
flags.DEFINE_integer("d_model", 256, "random model width")
flags.DEFINE_integer("layers", 4, "random model depth")
flags.DEFINE_list("clients", ["1", "8", "32"], "concurrent client counts")
flags.DEFINE_integer("requests", 4, "requests each client sends, one after another")
flags.DEFINE_integer("max_tokens", 64, "tokens generated per request")
flags.DEFINE_integer("prompt_tokens", 32, "prompt length in tokens")
flags.DEFINE_integer("max_batch", 32, "the server's rows (--max_batch)")
flags.DEFINE_integer("cold", 2, "cold `launch.generate` processes timed (0: none)")
flags.DEFINE_bool("quick", False, "a small model and load: checks that it runs (tests)")
flags.DEFINE_integer("repeats", 1, "runs of each load and of the engine alone, interleaved: "
                     "the fastest run's tokens/s (and profile) is reported, TTFT and latency "
                     "percentiles over all runs (a machine shared with other work)", lower_bound=1)
flags.DEFINE_bool("profile", False, "also print where a decode step's time goes, per load "
                  "(benchmarks/serve_profile.py)")
flags.DEFINE_string("json", "", "write the figures here")
FLAGS = flags.FLAGS


def random_model(directory: str, d_model: int, layers: int) -> str:
  """A random decoder with the bundled tokenizer, exported as a Hugging Face directory."""
  import jax
  import jax.numpy as jnp
  from lmjax import pretrained
  from lmjax.convert import export_hf
  from lmjax.data import BUNDLED_DIR, Tokenizer
  from lmjax.model import TransformerConfig, build_model
  from lmjax.sharding import unbox
  tokenizer = Tokenizer(os.path.join(BUNDLED_DIR, "tokenizer.model"))
  cfg = TransformerConfig(vocab_size=tokenizer.vocab_size, max_len=512, d_model=d_model,
                          num_layers=layers, num_heads=max(d_model // 64, 1), d_ff=4 * d_model)
  params = build_model(cfg).init(jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32))["params"]
  source = pretrained.Pretrained(cfg, jax.tree.map(np.asarray, unbox(params)), tokenizer, "clm",
                                 "random")
  export_hf(source, directory)
  return directory


def make_prompts(tokenizer, count: int, length: int) -> list[list[int]]:
  """`count` windows of the bundled validation text, BOS first, `length` tokens each."""
  from lmjax.data import BUNDLED_DIR
  with open(os.path.join(BUNDLED_DIR, "valid.txt"), encoding="utf-8") as f:
    ids = tokenizer.encode([f.read()])[0]
  stride = max((len(ids) - length) // max(count, 1), 1)
  bos = [tokenizer.special.bos] if tokenizer.special.bos >= 0 else []
  return [bos + ids[i * stride:i * stride + length - len(bos)] for i in range(count)]


def one_request(http, url: str, prompt: list[int], max_tokens: int, seed: int
                ) -> dict[str, float]:
  """A streamed completion through `http` (an httpx.Client, its connection kept open as the
  openai client's is): time to first text, latency and tokens."""
  body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 1.0, "seed": seed,
          "stream": True, "stream_options": {"include_usage": True}}
  began, first, tokens = time.perf_counter(), None, 0
  with http.stream("POST", url + "/v1/completions", json=body, timeout=600) as r:
    if r.status_code != 200:
      raise RuntimeError(f"the server answered {r.status_code}: {r.read()[:300]!r}")
    for line in r.iter_lines():
      if not line.startswith("data: {"):
        continue
      chunk = json.loads(line[6:])
      if first is None and chunk["choices"] and chunk["choices"][0]["text"]:
        first = time.perf_counter()
      if chunk.get("usage"):
        tokens = chunk["usage"]["completion_tokens"]
  end = time.perf_counter()
  return {"ttft": (first or end) - began, "latency": end - began, "tokens": tokens}


def run_load(url: str, prompts: list[list[int]], clients: int, requests: int,
             max_tokens: int) -> dict[str, float]:
  """`clients` threads each sending `requests` requests in turn; the load's figures."""
  results: list[dict] = []
  errors: list[BaseException] = []

  def client(c: int) -> None:
    import httpx
    try:
      with httpx.Client() as http:  # a new client costs ~50 ms (its TLS context)
        for k in range(requests):
          i = c * requests + k
          results.append(one_request(http, url, prompts[i % len(prompts)], max_tokens, i))
    except BaseException as e:  # reported after the join
      errors.append(e)
  threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
  began = time.perf_counter()
  for t in threads:
    t.start()
  for t in threads:
    t.join(900)
  wall = time.perf_counter() - began
  if errors or len(results) != clients * requests:
    raise RuntimeError(f"{clients} clients: {errors[0] if errors else 'a client hung'}")
  return dict(summarize(results, wall, clients), results=results)


def best_of(runs: list[tuple[dict, dict]]) -> tuple[dict, dict]:
  """Repeats of one load, (figures, phases) each -> the fastest run's figures and phases, with
  TTFT and latency percentiles over every run's requests."""
  load, phases = max(runs, key=lambda run: run[0]["tokens_per_s"])
  pooled = summarize([r for run, _ in runs for r in run["results"]], 1.0, load["clients"])
  keep = {k: v for k, v in load.items() if k != "results"}
  keep.update({k: v for k, v in pooled.items() if k.startswith(("ttft", "latency"))},
              runs=len(runs))
  return keep, phases


def summarize(results: list[dict], wall: float, clients: int) -> dict[str, float]:
  ttft = np.array([r["ttft"] for r in results]) * 1e3
  latency = np.array([r["latency"] for r in results]) * 1e3
  tokens = sum(r["tokens"] for r in results)
  return {"clients": clients, "requests": len(results), "tokens": tokens, "seconds": wall,
          "tokens_per_s": tokens / wall,
          "ttft_ms_p50": float(np.percentile(ttft, 50)),
          "ttft_ms_p99": float(np.percentile(ttft, 99)),
          "latency_ms_p50": float(np.percentile(latency, 50)),
          "latency_ms_p99": float(np.percentile(latency, 99))}


def generate_loop(workdir: str, prompts: list[list[int]], max_tokens: int) -> dict[str, float]:
  """The prompts one at a time through a warm Generator (launch.generate's decoder)."""
  from lmjax import pretrained
  from lmjax.inference.generate import Generator, SamplingConfig
  source = pretrained.load(workdir)
  special = source.tokenizer.special
  gen = Generator(source.model, source.params, eos=special.eos, pad=max(special.pad, 0))
  sampling = SamplingConfig(max_tokens, temperature=1.0, top_k=0, top_p=1.0)
  gen.generate(prompts[:1], sampling)  # compile
  results = []
  began = time.perf_counter()
  for i, prompt in enumerate(prompts):
    start = time.perf_counter()
    out = gen.generate([prompt], sampling, seed=i)[0]
    took = time.perf_counter() - start
    results.append({"ttft": took, "latency": took, "tokens": len(out)})  # no streaming
  return summarize(results, time.perf_counter() - began, 1)


def engine_alone(workdir: str, prompts: list[list[int]], counts: list[int]
                 ) -> tuple[dict[int, float], dict[int, dict]]:
  """Tokens/s of the engine in this process, no HTTP: `count` prompts submitted at once, for
  each count. The ratio between counts is what batching allows on this machine. Also the
  engine's phases over each count's run."""
  from benchmarks import serve_profile
  from lmjax import pretrained
  from lmjax.inference.engine import Engine, generate_all
  source = pretrained.load(workdir)
  engine = Engine(source.model, source.params, pad=max(source.tokenizer.special.pad, 0),
                  slots=FLAGS.max_batch, max_len=FLAGS.prompt_tokens + FLAGS.max_tokens).start()
  try:
    generate_all(engine, prompts[:1], FLAGS.max_tokens)  # warm
    runs: dict[int, list] = {count: [] for count in counts}
    for _ in range(FLAGS.repeats):
      for count in counts:
        before = (serve_profile.Probe(None, None), engine.phases.snapshot())
        outs = generate_all(engine, prompts[:count], FLAGS.max_tokens)
        after = (serve_profile.Probe(None, None), engine.phases.snapshot())
        runs[count].append((sum(map(len, outs)) / (after[0].wall - before[0].wall),
                            serve_profile.delta(before[0], after[0], {"before": before[1],
                                                                      "after": after[1]})))
    best = {count: max(r, key=lambda run: run[0]) for count, r in runs.items()}
    rates = {count: rate for count, (rate, _) in best.items()}
    phases = {count: p for count, (_, p) in best.items()}
    return rates, phases
  finally:
    engine.stop()


def cold_generate(workdir: str, count: int, max_tokens: int) -> float:
  """Seconds per `python -m launch.generate` process (start, load, compile, decode)."""
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  began = time.perf_counter()
  for i in range(count):
    subprocess.run([sys.executable, "-m", "launch.generate", f"--workdir={workdir}",
                    "--prompt=ROMEO.", f"--max_new_tokens={max_tokens}", "--temperature=1",
                    f"--seed={i}"], cwd=root, check=True, capture_output=True, timeout=600)
  return (time.perf_counter() - began) / count


def serve_loads(workdir: str, prompts: list[list[int]], counts: list[int]
                ) -> tuple[dict, list, list]:
  """Starts launch.serve and runs each load against it; (its /health, the loads, the phases
  of each load)."""
  import httpx
  from benchmarks import serve_profile
  from lmjax.inference.serve_process import spawn
  with tempfile.TemporaryFile("w+") as log:
    proc, url = spawn(workdir, f"--max_batch={FLAGS.max_batch}",
                      f"--max_len={FLAGS.prompt_tokens + FLAGS.max_tokens}", log=log)
    health = lambda: httpx.get(url + "/health", timeout=30).json()
    try:
      with httpx.Client() as http:  # warm: the first steps
        one_request(http, url, prompts[0], FLAGS.max_tokens, 0)
      runs: dict[int, list] = {c: [] for c in counts}
      for _ in range(FLAGS.repeats):
        for c in counts:
          before = serve_profile.Probe(health(), proc.pid)
          load = run_load(url, prompts, c, FLAGS.requests, FLAGS.max_tokens)
          runs[c].append((load, serve_profile.delta(before, serve_profile.Probe(health(),
                                                                              proc.pid))))
      loads, phases = map(list, zip(*(best_of(runs[c]) for c in counts)))
      final = health()
    finally:
      os.killpg(proc.pid, signal.SIGTERM)
      code = proc.wait(120)
    if code != 0:
      log.seek(0)
      raise RuntimeError(f"launch.serve exited {code}: {log.read()[-2000:]}")
  return final, loads, phases


@cli_main
def main(argv: list[str]) -> None:
  del argv
  import logging
  logging.getLogger("httpx").setLevel(logging.WARNING)  # a line per request otherwise
  if FLAGS.quick:
    FLAGS.d_model, FLAGS.layers, FLAGS.requests, FLAGS.max_tokens = 64, 2, 2, 8
    FLAGS.prompt_tokens, FLAGS.max_batch, FLAGS.cold, FLAGS.clients = 16, 4, 1, ["1", "4"]
  counts = [int(c) for c in FLAGS.clients]
  with tempfile.TemporaryDirectory() as tmp:
    workdir = FLAGS.workdir or random_model(os.path.join(tmp, "model"), FLAGS.d_model,
                                            FLAGS.layers)
    from lmjax import pretrained
    source = pretrained.load(workdir)
    prompts = make_prompts(source.tokenizer, max(counts) * FLAGS.requests, FLAGS.prompt_tokens)
    health, loads, served_phases = serve_loads(workdir, prompts, counts)
    baseline_clients = 8 if 8 in counts else max(counts)
    alone, alone_phases = engine_alone(workdir, prompts, counts)
    loop = generate_loop(workdir, prompts[:baseline_clients * FLAGS.requests], FLAGS.max_tokens)
    cold = cold_generate(workdir, FLAGS.cold, FLAGS.max_tokens) if FLAGS.cold else None
    profile = None
    if FLAGS.profile:
      from benchmarks import serve_profile
      cache_len = FLAGS.prompt_tokens + FLAGS.max_tokens
      device = serve_profile.device_steps(source, counts, cache_len)
      for rows, ms in serve_profile.engine_steps(source, counts, cache_len).items():
        device[rows]["decode_ms"] = ms
      profile = {"served": served_phases, "engine_alone": alone_phases, "device": device,
                 "limits": serve_profile.ceilings(loads, served_phases, device, baseline_clients,
                                                  os.cpu_count() or 1)}
  report(source, health, loads, alone, loop, cold, baseline_clients, profile)


def report(source, health: dict, loads: list[dict], alone: dict[int, float], loop: dict,
           cold: float | None, baseline_clients: int, profile: dict | None) -> None:
  cfg = source.model
  one = next((x for x in loads if x["clients"] == 1), loads[0])
  per_row = health["kv_cache_bytes"] / health["rows"]
  print(f"launch.serve: d_model {cfg.d_model} x {cfg.num_layers} layers ({source.source}), "
        f"{health['rows']} rows x {health['max_len']} tokens, KV cache "
        f"{per_row / 2 ** 20:.2f} MiB a row; {FLAGS.requests} requests a client, prompts of "
        f"{FLAGS.prompt_tokens} tokens, {FLAGS.max_tokens} new tokens")
  print(f"  {'load':24s} {'tokens/s':>9s} {'x 1 client':>10s} {'TTFT p50/p99 ms':>17s} "
        f"{'latency p50/p99 ms':>19s}")
  for x in loads + [loop]:
    name = (f"{x['clients']} client(s)" if x is not loop
            else f"generate loop ({baseline_clients * FLAGS.requests} req)")
    print(f"  {name:24s} {x['tokens_per_s']:9.1f} {x['tokens_per_s'] / one['tokens_per_s']:10.2f} "
          f"{x['ttft_ms_p50']:8.0f}/{x['ttft_ms_p99']:<8.0f} "
          f"{x['latency_ms_p50']:9.0f}/{x['latency_ms_p99']:<9.0f}")
  print("  the engine alone (greedy, no HTTP), tokens/s by rows: " + ", ".join(
      f"{k}: {v:.1f} ({v / alone[counts_one(alone)]:.2f}x)" for k, v in alone.items()))
  targets = []
  same = next((x for x in loads if x["clients"] == baseline_clients), None)
  if same:
    print(f"  {baseline_clients} clients against the generate loop on the same requests: "
          f"{same['tokens_per_s'] / loop['tokens_per_s']:.2f}x the tokens/s")
  if cold is not None:
    print(f"  a cold `python -m launch.generate` process: {cold:.1f}s a request "
          f"({FLAGS.max_tokens / cold:.1f} tokens/s)")
  eight = next((x for x in loads if x["clients"] == 8), None)
  if eight and one["clients"] == 1:
    ratio = eight["tokens_per_s"] / one["tokens_per_s"]
    bound = alone[8] / alone[1] if 8 in alone and 1 in alone else None
    targets.append({"target": "8 clients >= 4x one client's tokens/s", "ratio": ratio,
                    "met": ratio >= 4, "engine_alone_ratio": bound})
    print(f"  target 8 clients >= 4x one client: {ratio:.2f}x "
          f"({'met' if ratio >= 4 else 'NOT met'}); the engine alone gets "
          f"{bound:.2f}x from 8 rows on this machine (target >= 6x: "
          f"{'met' if bound and bound >= 6 else 'NOT met'})")
    targets.append({"target": "the engine alone at 8 rows >= 6x its tokens/s at 1 row",
                    "ratio": bound, "met": bool(bound and bound >= 6)})
  if profile:
    report_profile(loads, alone, profile)
  if FLAGS.json:
    with open(FLAGS.json, "w") as f:
      json.dump({"health": health, "loads": loads, "generate_loop": loop,
                 "cold_generate_s": cold, "kv_cache_bytes_per_row": per_row,
                 "engine_alone_tokens_per_s": alone, "profile": profile,
                 "targets": targets}, f, indent=2)


def report_profile(loads: list[dict], alone: dict[int, float], profile: dict) -> None:
  from benchmarks import serve_profile
  print("where the time goes (--profile)")
  serve_profile.print_table(
      [(f"{x['clients']} client(s)", p) for x, p in zip(loads, profile["served"])] +
      [(f"engine alone, {k} rows", p) for k, p in profile["engine_alone"].items()])
  print("  the device alone, ms: " + "; ".join(
      f"{rows} rows: forward {d['forward_ms']:.2f}, sampler {d['sampler_ms']:.2f}, the "
      f"engine's decode program {d['decode_ms']:.2f} a step" for rows, d in
      profile["device"].items()))
  serve_profile.print_ceilings(profile["limits"], os.cpu_count() or 1)


def counts_one(rates: dict[int, float]) -> int:
  return 1 if 1 in rates else min(rates)


if __name__ == "__main__":
  app.run(main)
