"""KV-cache decoding equals full forward passes; sampling options behave as documented."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lmjax.inference.decoder import sample
from lmjax.inference.generate import Generator, SamplingConfig
from lmjax.model import TransformerConfig, build_model

VARIANTS = {
    "gpt2": dict(),
    "llama": dict(position="rope", norm="rmsnorm", mlp="swiglu", activation="silu",
                  use_bias=False, tie_embeddings=False, num_kv_heads=2),
    "unrolled": dict(scan_layers=False),
}
PROMPTS = [[2, 17, 33, 9, 41], [2, 5], [2, 60, 61, 62, 63, 64, 65, 66, 67, 68, 69, 70, 71, 72,
                                        73, 74, 75, 76, 77]]


def _generator(variant):
  cfg = TransformerConfig(vocab_size=97, max_len=64, d_model=32, num_layers=2, num_heads=4,
                          d_ff=64, init_std=0.3, **VARIANTS[variant])
  params = build_model(cfg).init(jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32))["params"]
  return Generator(cfg, params, eos=3, pad=0)


@pytest.mark.parametrize("variant", VARIANTS)
def test_greedy_with_cache_equals_argmax_of_full_forward_passes(variant):
  gen = _generator(variant)
  want = gen.greedy_without_cache(PROMPTS, 12)
  got = gen.generate(PROMPTS, SamplingConfig(max_new_tokens=12))
  assert got == want
  assert [len(g) for g in got] != [0, 0, 0]
  streamed = [list(gen.stream(p, SamplingConfig(max_new_tokens=12))) for p in PROMPTS]
  assert streamed == want


def test_generation_stops_at_eos():
  gen = _generator("gpt2")
  first = gen.generate(PROMPTS[:1], SamplingConfig(max_new_tokens=8))[0]
  eos = first[2]  # pretend the third token is EOS
  gen2 = Generator(gen.cfg, gen.params, eos=eos, pad=0)
  assert gen2.generate(PROMPTS[:1], SamplingConfig(max_new_tokens=8))[0] == first[:first.index(eos)]


def test_sampling_is_seeded_and_respects_top_k_and_top_p():
  logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]] * 2000))
  draw = lambda cfg, seed=0: np.asarray(sample(logits, *_rows(cfg, seed)))
  cfg = SamplingConfig(temperature=1.0)
  assert (draw(cfg) == draw(cfg)).all() and not (draw(cfg) == draw(cfg, 1)).all()
  freq = np.bincount(draw(cfg), minlength=4) / 2000
  assert np.allclose(freq, [0.5, 0.3, 0.15, 0.05], atol=0.04)
  assert set(draw(SamplingConfig(temperature=1.0, top_k=2)).tolist()) == {0, 1}
  assert set(draw(SamplingConfig(temperature=1.0, top_p=0.7)).tolist()) == {0, 1}
  assert set(draw(SamplingConfig(temperature=1.0, top_p=0.1)).tolist()) == {0}
  assert (draw(SamplingConfig()) == 0).all()  # temperature 0 is greedy
  low = np.bincount(draw(SamplingConfig(temperature=0.25)), minlength=4) / 2000
  assert low[0] > 0.85


def _rows(cfg: SamplingConfig, seed: int):
  """The sampler's arguments for 2000 rows of `cfg` (keys seed, seed + 1, ...)."""
  temperature, top_p, top_k, keys = cfg.rows(seed, 2000)
  return keys, temperature, top_p, top_k


def test_sampled_generation_depends_on_the_seed_only():
  gen = _generator("gpt2")
  cfg = SamplingConfig(max_new_tokens=10, temperature=1.0, top_k=20)
  a, b = gen.generate(PROMPTS, cfg, seed=1), gen.generate(PROMPTS, cfg, seed=1)
  assert a == b and a != gen.generate(PROMPTS, cfg, seed=2)
