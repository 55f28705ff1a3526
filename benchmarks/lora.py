"""LoRA and QLoRA against full fine-tuning, in one run, on this machine.

  python -m benchmarks.lora [--shapes 135m,1b] [--time_shapes 135m] [--time_layers 1,2]
      [--chat] [--json OUT]

For LLaMA-shaped models with random weights (135M: SmolLM-135M's shape; 1B: Llama 3.2
1B's; both tie the embeddings as those models do), float32 weights, full rematerialisation, a causal-LM step of `--batch` rows of
`--seq_len` tokens:

- peak memory of the train step as XLA plans it (arguments + temporaries + outputs -
  donated buffers that outputs reuse: the state, the batch and the step's working set);
  compiled from abstract arrays, nothing allocated, so the 1B shape is measured on any
  machine;
- checkpoint size: the bytes a checkpoint holds (full: weights and both Adam moments;
  LoRA: adapters and their moments);
- step time (`--time_shapes`, weights allocated): full vs LoRA r=16 vs QLoRA int8/nf4,
  interleaved, the minimum of `--repeats`, as ratios to full fine-tuning; with
  `--time_layers 2,4` timed at those depths of the shape (same widths and vocabulary) and
  extrapolated along a line to its own depth, for a shape whose full fine-tuning does not fit
  in memory here (1B: 20 GiB of state);
- with `--chat`: chat_tiny's held-out assistant loss after the same number of SFT steps of
  full fine-tuning, LoRA and QLoRA int8/nf4, each from one clm_tiny base trained here first.
"""

from __future__ import annotations

import functools
import json
import os
import tempfile
import time

import jax
import numpy as np
from absl import app, flags

from lmjax import objectives
from lmjax.data.tokenizer import SpecialTokens
from lmjax.lora import LoraConfig
from lmjax.model import TransformerConfig
from lmjax.optim import OptimizerConfig
from lmjax.sharding import unbox
from lmjax.steps import init_state, step_fns, train_step

flags.DEFINE_list("shapes", ["135m", "1b"], "model shapes for memory and checkpoint size")
flags.DEFINE_list("time_shapes", ["135m"], "model shapes whose steps are also timed")
flags.DEFINE_list("time_layers", [], "time at these depths, not the shape's own; two or more "
                  "extrapolate to its depth (a scanned stack costs the same per layer)")
flags.DEFINE_integer("batch", 4, "rows per step")
flags.DEFINE_integer("seq_len", 512, "tokens per row")
flags.DEFINE_integer("repeats", 3, "timed rounds (minimum kept)")
flags.DEFINE_bool("chat", False, "also SFT chat_tiny: held-out loss of each variant")
flags.DEFINE_integer("chat_steps", 150, "SFT steps of each variant on chat_tiny")
flags.DEFINE_integer("base_steps", 300, "clm_tiny pretraining steps of the chat base")
flags.DEFINE_integer("chat_batch", 16, "SFT rows per step (chat_tiny's: 16)")
flags.DEFINE_string("json", "", "write the figures here")
FLAGS = flags.FLAGS

SPECIAL = SpecialTokens(pad=0, unk=1, bos=2, eos=3, mask=4, cls=5, sep=6)
SHAPES = {  # LLaMA shapes: (vocab, d_model, layers, heads, kv heads, d_ff)
    "135m": (49152, 576, 30, 9, 3, 1536), "1b": (128256, 2048, 16, 32, 8, 8192),
    "tiny": (512, 64, 2, 4, 2, 128)}
VARIANTS = {"full": None, "lora_r16": "float", "qlora_int8": "int8", "qlora_nf4": "nf4"}


def model_config(shape: str, seq_len: int, depth: int = 0) -> TransformerConfig:
  vocab, d, layers, heads, kv, ff = SHAPES[shape]
  layers = depth or layers
  return TransformerConfig(family="decoder", vocab_size=vocab, max_len=seq_len, d_model=d,
                           num_layers=layers, num_heads=heads, num_kv_heads=kv, d_ff=ff,
                           position="rope", norm="rmsnorm", mlp="swiglu", activation="silu",
                           use_bias=False, tie_embeddings=True, dtype="float32",
                           scan_layers=True, remat_policy="full")


def fns_for(shape: str, variant: str, seq_len: int, depth: int = 0):
  cfg = model_config(shape, seq_len, depth)
  base = VARIANTS[variant]
  lora = None if base is None else LoraConfig(enabled=True, rank=16, alpha=32.0,
                                              targets=("attention_mlp",), base_dtype=base)
  objective = objectives.build(objectives.objective_class("clm").config_class(kind="clm"),
                               SPECIAL, cfg.vocab_size)
  return step_fns(cfg, objective, OptimizerConfig(warmup_steps=0), 1000, 1, lora, 8)


def real_batch(fns, rows: int, seq_len: int, vocab: int) -> dict:
  spec = fns.objective.batch_spec(seq_len)
  rng = np.random.default_rng(0)
  out = {}
  for key, (shape, dtype) in spec.items():
    full = (rows, *shape)
    out[key] = (rng.integers(10, vocab, size=full) if "token" in key or key in ("inputs",
                "targets") else np.ones(full)).astype(dtype)
  return out


def memory_and_size(shape: str, variant: str, rows: int, seq_len: int) -> dict:
  """XLA's planned peak of one train step and the checkpoint's bytes, from abstract arrays."""
  fns = fns_for(shape, variant, seq_len)
  state = unbox(jax.eval_shape(lambda: init_state(fns, 0, (1, 8))))
  spec = fns.objective.batch_spec(seq_len)
  batch = {k: jax.ShapeDtypeStruct((rows, *s), d) for k, (s, d) in spec.items()}
  compiled = jax.jit(functools.partial(train_step, fns), donate_argnums=(0,)).lower(
      state, batch).compile()
  m = compiled.memory_analysis()
  peak = (m.argument_size_in_bytes + m.temp_size_in_bytes + m.output_size_in_bytes
          - m.alias_size_in_bytes)
  saved = state.replace(params=fns.trainable(state.params))
  size = lambda tree: sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))
  return {"peak_gib": peak / 2 ** 30, "checkpoint_mib": size(saved) / 2 ** 20,
          "weights_mib": size(state.params) / 2 ** 20,
          "trainable_params": sum(x.size for x in jax.tree.leaves(fns.trainable(state.params)))}


def step_times(shape: str, rows: int, seq_len: int, repeats: int,
               depth: int = 0) -> dict[str, float]:
  """Seconds per step of each variant (weights allocated), interleaved, minimum kept."""
  runs = {}
  for variant in VARIANTS:
    fns = fns_for(shape, variant, seq_len, depth)
    state = jax.jit(lambda fns=fns: unbox(init_state(fns, 0, (1, 8))))()
    step = jax.jit(functools.partial(train_step, fns), donate_argnums=(0,))
    vocab = model_config(shape, seq_len).vocab_size
    batch = jax.device_put(real_batch(fns, rows, seq_len, vocab))
    state, metrics = step(state, batch)  # compile
    jax.block_until_ready(metrics)
    runs[variant] = [step, state, batch]
  best = {v: float("inf") for v in runs}
  for _ in range(repeats):
    for variant, run in runs.items():
      began = time.perf_counter()
      run[1], metrics = run[0](run[1], run[2])
      jax.block_until_ready(metrics)
      best[variant] = min(best[variant], time.perf_counter() - began)
  return best


def timed_steps(shape: str, rows: int, seq_len: int, repeats: int,
                depths: list[int]) -> tuple[dict[str, float], dict[int, dict[str, float]]]:
  """Step times at the shape's depth: measured there, or (with `depths`, for a shape whose
  full fine-tuning does not fit this machine) least-squares line through the depths timed,
  evaluated at the shape's depth. Also returns what each depth measured."""
  depth = SHAPES[shape][2]
  measured = {n: step_times(shape, rows, seq_len, repeats, n) for n in depths or [depth]}
  if depth in measured:
    return measured[depth], measured
  if len(measured) < 2:
    raise ValueError(f"--time_layers needs two depths to extrapolate to {depth} layers")
  xs = np.array(sorted(measured), dtype=float)
  at_depth = {}
  for v in VARIANTS:
    slope, offset = np.polyfit(xs, [measured[int(n)][v] for n in xs], 1)
    at_depth[v] = float(offset + slope * depth)
  return at_depth, measured


def chat_losses(steps: int, base_steps: int, batch: int, folder: str) -> dict[str, dict]:
  """chat_tiny's held-out loss after `steps` SFT steps of each variant, from one base."""
  from experiments import chat_tiny, clm_tiny
  from lmjax.experiment import experiment_from_dict
  from lmjax.run import train_and_evaluate
  base = os.path.join(folder, "clm_tiny")
  pretrain = clm_tiny.get_config()
  pretrain.train.update(steps=base_steps, eval_every=0)
  train_and_evaluate(experiment_from_dict(pretrain.to_dict()), base)
  out = {}
  for variant, base_dtype in VARIANTS.items():
    c = chat_tiny.get_config()
    c.train.update(steps=steps, eval_every=0, checkpoint_every=steps, init_from=base,
                   batch_size=batch)
    if base_dtype is not None:
      c.lora.update(enabled=True, rank=16, alpha=32.0, targets=("attention_mlp",),
                    base_dtype=base_dtype)
      c.optimizer.learning_rate = 5e-3  # LoRA's usual larger rate (full: chat_tiny's 1e-3)
    workdir = os.path.join(folder, variant)
    began = time.perf_counter()
    metrics = train_and_evaluate(experiment_from_dict(c.to_dict()), workdir)
    ckpt = os.path.join(workdir, "checkpoints", str(steps))
    disk = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(ckpt) for f in fs)
    out[variant] = {"eval_loss": metrics["loss"], "seconds": time.perf_counter() - began,
                    "checkpoint_disk_mib": disk / 2 ** 20}
  return out


def memory_rows(shape: str, rows: int, seq_len: int) -> dict[str, dict]:
  """memory_and_size of each variant, with ratios to full fine-tuning, printed."""
  out = {v: memory_and_size(shape, v, rows, seq_len) for v in VARIANTS}
  full = out["full"]
  for v, r in out.items():
    r["peak_vs_full"] = r["peak_gib"] / full["peak_gib"]
    r["checkpoint_vs_full"] = r["checkpoint_mib"] / full["checkpoint_mib"]
    print(f"{shape} {v:11s} peak {r['peak_gib']:7.2f} GiB ({r['peak_vs_full']:.2f}x)  "
          f"checkpoint {r['checkpoint_mib']:9.1f} MiB ({r['checkpoint_vs_full']:.4f}x)  "
          f"trainable {r['trainable_params'] / 1e6:.2f}M", flush=True)
  return out


def main(argv: list[str]) -> None:
  del argv
  report: dict = {"batch": FLAGS.batch, "seq_len": FLAGS.seq_len,
                  "device": jax.devices()[0].device_kind}
  for shape in dict.fromkeys([*FLAGS.shapes, *FLAGS.time_shapes]):
    rows = {v: {} for v in VARIANTS}
    if shape in FLAGS.shapes:
      rows = memory_rows(shape, FLAGS.batch, FLAGS.seq_len)
    if shape in FLAGS.time_shapes:
      times, measured = timed_steps(shape, FLAGS.batch, FLAGS.seq_len, FLAGS.repeats,
                                    [int(n) for n in FLAGS.time_layers])
      for n, at in measured.items():
        print(f"{shape} at {n} layers: " + ", ".join(
            f"{v} {t:.3f}s ({t / at['full']:.2f}x)" for v, t in at.items()), flush=True)
        for v, t in at.items():
          rows[v].setdefault("step_s_by_depth", {})[n] = t
      for v, t in times.items():
        rows[v]["step_s"], rows[v]["step_vs_full"] = t, t / times["full"]
        print(f"{shape} {v:11s} step {t:.3f}s ({t / times['full']:.2f}x full)", flush=True)
    report[shape] = rows
  if FLAGS.chat:
    with tempfile.TemporaryDirectory() as folder:
      report["chat_tiny"] = chat_losses(FLAGS.chat_steps, FLAGS.base_steps, FLAGS.chat_batch,
                                        folder)
    for v, r in report["chat_tiny"].items():
      print(f"chat_tiny {v:11s} held-out loss {r['eval_loss']:.4f}  checkpoint on disk "
            f"{r['checkpoint_disk_mib']:.2f} MiB  {r['seconds']:.0f}s", flush=True)
  if FLAGS.json:
    with open(FLAGS.json, "w") as f:
      json.dump(report, f, indent=2)


if __name__ == "__main__":
  app.run(main)
