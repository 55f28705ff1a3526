"""Greedy decode speed: KV cache vs full forward passes vs `transformers` generate.

  python -m benchmarks.decode [--workdir RUN] [--d_model 256 --layers 4] [--new_tokens 128]
      [--batch 1] [--repeats 3]

Without --workdir a GPT-2-shaped model of the given size is initialised at
random (decode speed does not depend on the weights). The same weights are
exported to `transformers` (GPT2LMHeadModel or LlamaForCausalLM, torch, float32)
and decoded with `generate(do_sample=False)`. Every figure is the minimum over
--repeats runs, candidates interleaved, all in one process.
"""

from __future__ import annotations

import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from launch.cli import cli_main
from lmjax import pretrained
from lmjax.data.tokenizer import SpecialTokens
from lmjax.inference.generate import Generator, SamplingConfig
from lmjax.model import TransformerConfig, build_model
from lmjax.sharding import unbox

FLAGS = flags.FLAGS


class _NoTokenizer:
  """Decode speed needs no text; the exporter only needs the special ids."""
  special = SpecialTokens(pad=0, unk=1, bos=2, eos=-1, mask=-1, cls=-1, sep=-1)
  path = None


def random_source(d_model: int, layers: int) -> pretrained.Pretrained:
  cfg = TransformerConfig(vocab_size=2048, max_len=1024, d_model=d_model, num_layers=layers,
                          num_heads=max(d_model // 64, 1), d_ff=4 * d_model)
  params = build_model(cfg).init(jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32))["params"]
  params = jax.tree.map(np.asarray, unbox(params))
  return pretrained.Pretrained(cfg, params, _NoTokenizer(), "clm", "random")


def timed(fn) -> float:
  start = time.perf_counter()
  fn()
  return time.perf_counter() - start


def hf_generate(source: pretrained.Pretrained, prompts: np.ndarray, new: int):
  """A callable running transformers' greedy generate on `source`'s weights."""
  import torch
  import transformers
  from lmjax.convert import export_hf
  with tempfile.TemporaryDirectory() as tmp:
    export_hf(source, tmp)
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp).eval()
  ids = torch.tensor(prompts, dtype=torch.long)

  def run():
    with torch.no_grad():
      model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new,
                     min_new_tokens=new, do_sample=False, pad_token_id=0)
  return run


def measure(source: pretrained.Pretrained, batch: int, new: int, prompt_len: int, repeats: int,
            with_hf: bool) -> dict[str, float]:
  rng = np.random.default_rng(0)
  prompts = rng.integers(10, source.model.vocab_size, size=(batch, prompt_len))
  gen = Generator(source.model, jax.tree.map(jnp.asarray, source.params), eos=-1, pad=0)
  sampling = SamplingConfig(max_new_tokens=new)
  candidates = {
      "kv_cache": lambda: gen.generate(prompts.tolist(), sampling),
      "no_cache": lambda: gen.greedy_without_cache(prompts.tolist(), new),
  }
  if with_hf:
    candidates["hf_generate"] = hf_generate(source, prompts, new)
  for fn in candidates.values():
    fn()  # compile / warm up
  times = {name: [] for name in candidates}
  for _ in range(repeats):  # interleaved
    for name, fn in candidates.items():
      times[name].append(timed(fn))
  return {name: batch * new / min(t) for name, t in times.items()}


@cli_main
def main(argv: list[str]) -> None:
  del argv
  source = (pretrained.load(FLAGS.workdir) if FLAGS.workdir
            else random_source(FLAGS.d_model, FLAGS.layers))
  rates = measure(source, FLAGS.batch, FLAGS.new_tokens, FLAGS.prompt_tokens, FLAGS.repeats,
                  FLAGS.hf)
  print(f"greedy decode, batch {FLAGS.batch}, {FLAGS.new_tokens} new tokens, "
        f"d_model {source.model.d_model} x {source.model.num_layers} layers ({source.source})")
  for name, rate in rates.items():
    print(f"  {name:12s} {rate:10,.1f} tokens/s   {rate / rates['kv_cache']:6.3f}x of kv_cache")


def _define_flags() -> None:
  flags.DEFINE_string("workdir", None, "an lmjax run or Hugging Face directory (default: random)")
  flags.DEFINE_integer("d_model", 256, "random model width")
  flags.DEFINE_integer("layers", 4, "random model depth")
  flags.DEFINE_integer("new_tokens", 128, "tokens generated per row")
  flags.DEFINE_integer("prompt_tokens", 16, "prompt length")
  flags.DEFINE_integer("batch", 1, "rows decoded together")
  flags.DEFINE_integer("repeats", 3, "timed repeats (the minimum is reported)")
  flags.DEFINE_bool("hf", True, "also time transformers' generate on the same weights")


if __name__ == "__main__":
  _define_flags()
  app.run(main)
