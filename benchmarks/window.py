"""Sliding-window attention on CPU: what a window saves against full causal attention.

  python -m benchmarks.window [--seq 2048 --window 256] [--d_model 256 --layers 4]
      [--decode_batch 8] [--repeats 5] [--json out.json]

Each figure times a model with `model.sliding_window=--window` on every layer against the
same model with full causal attention, interleaved in one process (minimum over
--repeats):
  attention   blockwise attention alone, forward and backward, one row of --seq tokens,
              4 heads of 64: the key blocks behind the window are never visited
              (target: <= 0.4x of full causal);
  train step  a GPT-2-shaped decoder's training step (AdamW, float32), of which attention
              is a part;
  decode      one token per row for --decode_batch rows with a KV cache of --seq slots
              nearly full, at the model level (`build_model(cfg, decode=True)`, layers
              unrolled as the decoder runs them): a local layer reads only its window.
"""

from __future__ import annotations

import json
from typing import Callable

import jax
import jax.numpy as jnp
from absl import app, flags

from benchmarks.train_step import Shape, lmjax_step, time_interleaved
from launch.cli import cli_main
from lmjax.model import TransformerConfig, build_model
from lmjax.model.blockwise import blockwise_attention
from lmjax.model.attention import window_blocks
from lmjax.sharding import unbox

FLAGS = flags.FLAGS
TARGET = 0.4  # attention forward + backward, windowed / full causal
DECODE_STEPS = 8  # tokens per timed call


def attention_step(seq: int, window: int | None) -> Callable[[], None]:
  """Blockwise attention forward and backward on (1, seq, 4, 64), as the model calls it."""
  keys = jax.random.split(jax.random.PRNGKey(0), 3)
  q, k, v = (jax.random.normal(key, (1, seq, 4, 64)) for key in keys)
  seg = jnp.ones((1, seq), jnp.int32)
  block = window_blocks(window)
  loss = lambda q, k, v: jnp.sum(blockwise_attention(q, k, v, seg, True, None, block, block,
                                                     window=window) ** 2)
  grad = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
  return lambda: jax.block_until_ready(grad(q, k, v))


def decode_step(cfg: TransformerConfig, batch: int) -> Callable[[], None]:
  """DECODE_STEPS one-token calls on a cache of cfg.max_len slots filled to max_len - 64
  (cache donated, as the decoder does)."""
  cfg = cfg.replace(scan_layers=False)
  model = build_model(cfg, decode=True)
  length = cfg.max_len
  params = unbox(build_model(cfg).init(jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32)))
  shapes = jax.eval_shape(lambda: model.apply(params, jnp.zeros((batch, length), jnp.int32),
                                              mutable=["cache"])[1]["cache"])
  cache = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
  apply = lambda cache, tokens, seg, pos: model.apply({**params, "cache": cache}, tokens, seg,
                                                      pos, mutable=["cache"])[1]["cache"]
  filled = length - 64
  prompt = jnp.ones((batch, filled), jnp.int32)
  cache = jax.jit(apply)(cache, prompt, prompt, jnp.broadcast_to(jnp.arange(filled), prompt.shape))
  step = jax.jit(apply, donate_argnums=(0,))
  box, position = [cache], [filled]

  def run():
    for _ in range(DECODE_STEPS):
      ones = jnp.ones((batch, 1), jnp.int32)
      box[0] = step(box[0], ones, ones, jnp.full((batch, 1), position[0], jnp.int32))
      position[0] += 1
    jax.block_until_ready(box[0])
  return run


def measure(seq: int, window: int, d_model: int, layers: int, decode_batch: int,
            repeats: int) -> dict[str, dict[str, float]]:
  shape = Shape("clm", d_model, layers, seq, batch=1)
  full = shape.model()
  local = full.replace(sliding_window=window)
  sections = {
      "attention": {"full": attention_step(seq, None), "window": attention_step(seq, window)},
      "train_step": {"full": lmjax_step(shape, 1, full), "window": lmjax_step(shape, 1, local)},
      "decode": {"full": decode_step(full, decode_batch),
                 "window": decode_step(local, decode_batch)},
  }
  out = {}
  for name, candidates in sections.items():
    times = time_interleaved(candidates, repeats)
    per = DECODE_STEPS if name == "decode" else 1
    out[name] = {"full_s": times["full"][0] / per, "window_s": times["window"][0] / per,
                 "ratio": times["window"][0] / times["full"][0]}
  return out


@cli_main
def main(argv: list[str]) -> None:
  del argv
  result = measure(FLAGS.seq, FLAGS.window, FLAGS.d_model, FLAGS.layers, FLAGS.decode_batch,
                   FLAGS.repeats)
  print(f"sliding window {FLAGS.window} vs full causal attention, {FLAGS.seq} tokens, CPU "
        f"({jax.devices()[0].device_kind}), d_model {FLAGS.d_model} x {FLAGS.layers} layers")
  for name, r in result.items():
    print(f"  {name:11s} full {r['full_s'] * 1e3:9.2f} ms   window {r['window_s'] * 1e3:9.2f} ms"
          f"   {r['ratio']:.3f}x")
  met = result["attention"]["ratio"] <= TARGET
  print(f"target: windowed attention forward+backward <= {TARGET}x of full causal: "
        f"{'met' if met else 'NOT met'}")
  if FLAGS.json:
    with open(FLAGS.json, "w") as f:
      json.dump({"config": {k: getattr(FLAGS, k) for k in ("seq", "window", "d_model",
                                                            "layers", "decode_batch")},
                 **result, "target_met": met}, f, indent=2)


def _define_flags() -> None:
  flags.DEFINE_integer("seq", 2048, "tokens per row (and cache slots when decoding)")
  flags.DEFINE_integer("window", 256, "model.sliding_window")
  flags.DEFINE_integer("d_model", 256, "model width (d_model / 64 heads, 4x MLP)")
  flags.DEFINE_integer("layers", 4, "model depth")
  flags.DEFINE_integer("decode_batch", 8, "rows decoded together")
  flags.DEFINE_integer("repeats", 5, "timed repeats per candidate (the minimum is reported)")
  flags.DEFINE_string("json", "", "also write the figures here")


if __name__ == "__main__":
  _define_flags()
  app.run(main)
