"""The accelerator benchmark: a ~1B LLaMA-style CLM in bfloat16 on one device.

  python -m benchmarks.gpu [--json OUT]      # on a GPU: about 5-8 minutes
  python -m benchmarks.gpu --tiny            # the same script at toy size, on CPU

Model: experiments/llama_1b.py (1.1B; RoPE, RMSNorm, SwiGLU, GQA), bfloat16
compute with float32 master weights, seq 2048, attention `auto` (cuDNN flash
attention on GPU), scanned layers. Sweeps remat policy x batch, printing tokens/s
and MFU against --peak_tflops (989 dense bf16 for H100/H200), then KV-cache
decode tokens/s at batch 1 as a fraction of the memory-bandwidth bound
(weights + cache bytes per step over the measured copy bandwidth). A
configuration that runs out of memory is reported as such and the sweep goes on;
the sweep stops early once --time_limit_s is spent.
"""

from __future__ import annotations

import json
import time

import jax
import numpy as np
from absl import app, flags

from benchmarks import limits
from benchmarks.train_step import Shape, lmjax_step
from experiments import llama_1b
from lmjax.experiment import experiment_from_dict
from lmjax.metrics import flops_per_token
from lmjax.model import build_model

flags.DEFINE_bool("tiny", False, "toy model on any device: checks the script, not the speed")
flags.DEFINE_float("peak_tflops", 989.0, "dense bf16 peak of the device (H100/H200: 989)")
flags.DEFINE_list("batches", ["4", "8", "16"], "global batch sizes to try")
flags.DEFINE_list("remat", ["dots_no_batch", "save_attention_out", "full"], "remat policies")
flags.DEFINE_integer("steps", 5, "timed steps per configuration")
flags.DEFINE_integer("time_limit_s", 420, "stop sweeping after this long")
flags.DEFINE_string("json", "", "write the results here")
FLAGS = flags.FLAGS


def model_config(tiny: bool):
  cfg = experiment_from_dict(llama_1b.get_config().to_dict()).model
  cfg = cfg.replace(dtype="bfloat16", param_dtype="float32", attention_impl="auto",
                    scan_layers=True)
  if tiny:
    cfg = cfg.replace(vocab_size=512, max_len=128, d_model=64, num_layers=2, num_heads=4,
                      num_kv_heads=2, d_ff=128)
  return cfg


def sweep(cfg, seq_len: int, peak: float, deadline: float) -> list[dict]:
  rows = []
  for policy in FLAGS.remat:
    for batch in (int(b) for b in FLAGS.batches):
      if time.perf_counter() > deadline:
        rows.append({"remat": policy, "batch": batch, "skipped": "time limit"})
        continue
      shape = Shape("clm", cfg.d_model, cfg.num_layers, seq_len, batch, cfg.vocab_size)
      row = {"remat": policy, "batch": batch}
      try:
        run = lmjax_step(shape, FLAGS.steps, cfg.replace(remat_policy=policy))
        run()  # compile and warm up
        start = time.perf_counter()
        run()
        step_s = (time.perf_counter() - start) / FLAGS.steps
      except Exception as e:  # out of memory is a result, not a failure of the sweep
        row["error"] = str(e).splitlines()[0][:120]
        print(f"   remat {policy:20s} batch {batch:3d}  {row['error']}", flush=True)
        rows.append(row)
        continue
      tokens = batch * seq_len / step_s
      row.update(step_s=step_s, tokens_per_s=tokens,
                 mfu=tokens * flops_per_token(cfg, seq_len) / peak)
      rows.append(row)
      print(f"   remat {policy:20s} batch {batch:3d}  {tokens:12,.0f} tok/s  MFU {row['mfu']:6.1%}",
            flush=True)
  return rows


def decode(cfg, params_dtype_bytes: int, bandwidth: float) -> dict:
  from lmjax.inference.generate import Generator, SamplingConfig
  from lmjax.sharding import unbox
  params = jax.jit(lambda: unbox(build_model(cfg).init(
      jax.random.PRNGKey(0), jax.numpy.zeros((1, 8), jax.numpy.int32))["params"]))()
  params = jax.tree.map(lambda x: x.astype(cfg.compute_dtype), params)  # serve in bf16
  gen = Generator(cfg, params, eos=-1, pad=0)
  new, prompt = min(128, cfg.max_len // 2), min(64, cfg.max_len // 4)
  sampling = SamplingConfig(max_new_tokens=new)
  prompts = np.random.default_rng(0).integers(10, cfg.vocab_size, (1, prompt)).tolist()
  gen.generate(prompts, sampling)
  start = time.perf_counter()
  gen.generate(prompts, sampling)
  rate = new / (time.perf_counter() - start)
  weights = sum(x.size for x in jax.tree.leaves(params)) * params_dtype_bytes
  cache = 2 * cfg.num_layers * cfg.kv_heads * cfg.dim_per_head * 2 * (prompt + new / 2)
  bound = bandwidth / (weights + cache)
  print(f"   decode batch 1: {rate:,.0f} tok/s = {rate / bound:.1%} of the bandwidth bound "
        f"({bound:,.0f} tok/s at {bandwidth / 1e9:,.0f} GB/s)")
  return {"tokens_per_s": rate, "bound_tokens_per_s": bound, "fraction": rate / bound,
          "bandwidth_bytes_per_s": bandwidth}


def main(argv: list[str]) -> None:
  del argv
  deadline = time.perf_counter() + FLAGS.time_limit_s
  cfg = model_config(FLAGS.tiny)
  seq_len = cfg.max_len if FLAGS.tiny else 2048
  peak = limits.matmul_flops("bfloat16", 512) if FLAGS.tiny else FLAGS.peak_tflops * 1e12
  shapes = jax.eval_shape(lambda: build_model(cfg).init(
      jax.random.PRNGKey(0), jax.numpy.zeros((1, 8), jax.numpy.int32)))
  n_params = sum(x.size for x in jax.tree.leaves(shapes))
  print(f"{jax.devices()[0].device_kind}: {n_params / 1e9:.2f}B-parameter LLaMA-style CLM, "
        f"seq {seq_len}, bf16 compute, peak {peak / 1e12:,.1f} TFLOP/s")
  rows = sweep(cfg, seq_len, peak, deadline)
  best = max((r for r in rows if "mfu" in r), key=lambda r: r["mfu"], default=None)
  if best:
    print(f"   best: remat {best['remat']}, batch {best['batch']}: MFU {best['mfu']:.1%} "
          f"(target 45%: {'met' if best['mfu'] >= 0.45 else 'MISSED'})")
  result = {"device": jax.devices()[0].device_kind, "params": n_params, "seq_len": seq_len,
            "peak_flops": peak, "sweep": rows, "best": best,
            "decode": decode(cfg, 2, limits.copy_bandwidth(64 if FLAGS.tiny else 2048))}
  if FLAGS.json:
    with open(FLAGS.json, "w") as f:
      json.dump(result, f, indent=2)


if __name__ == "__main__":
  app.run(main)
