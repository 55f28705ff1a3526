"""The continuous-batching engine: every request gets what it would get alone (greedy and
seeded sampling), requests join and leave the running batch, a long prompt's prefill
interleaves with the others' decoding, and the programs compiled at start-up serve everything."""

from __future__ import annotations

import threading

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lmjax.inference.decoder import sample
from lmjax.inference.engine import Engine, Request, generate_all
from lmjax.inference.generate import Generator, SamplingConfig


@pytest.fixture(scope="module")
def model(tiny_runs):
  from lmjax import pretrained
  return pretrained.load(str(tiny_runs / "clm_tiny"))


@pytest.fixture(scope="module")
def engine(model):
  eng = Engine(model.model, model.params, pad=model.tokenizer.special.pad, slots=3, chunk=32)
  eng.start()
  yield eng
  eng.stop()


def _prompts(model, texts):
  sp = model.tokenizer.special
  return [[sp.bos] + ids for ids in model.tokenizer.encode(texts)]


TEXTS = ["ROMEO.", "First Citizen:\nBefore we proceed any further, hear me speak.", "O",
         "What light through yonder window breaks?", "KING RICHARD II:\nOld John of Gaunt"]


class Recorder:
  """Collects one request's events, and the order in which all requests got theirs."""

  log: list = []
  lock = threading.Lock()
  engine = None  # when set, each event also records how many prefill chunks had run

  def __init__(self, name):
    self.name, self.tokens, self.reason, self.done = name, [], None, threading.Event()
    self.chunks_at: list[int] = []

  def __call__(self, event):
    with self.lock:
      Recorder.log.append((self.name, event[0]))
      if Recorder.engine is not None:
        self.chunks_at.append(Recorder.engine.chunks)
    if event[0] == "token":
      self.tokens.append(event[1])
    elif event[0] == "done":
      self.reason = event[1]
      self.done.set()


def test_greedy_equals_the_generator_with_more_requests_than_rows(model, engine):
  prompts = _prompts(model, TEXTS)  # 5 requests, 3 rows: two wait, then take freed rows
  sp = model.tokenizer.special
  gen = Generator(model.model, model.params, eos=sp.eos, pad=sp.pad)
  expected = gen.generate(prompts, SamplingConfig(max_new_tokens=24))
  assert generate_all(engine, prompts, 24, stop_ids=(sp.eos,)) == expected
  long = _prompts(model, ["word " * 90])  # 2 chunks of 32, then 27 tokens at width 32
  assert generate_all(engine, long, 10) == gen.generate(long, SamplingConfig(max_new_tokens=10))


def test_a_request_joins_the_running_batch_and_prefill_interleaves(model, engine):
  first, second = _prompts(model, ["ROMEO.", "word " * 170])
  chunks = -(-len(second) // engine.chunk)
  assert chunks >= 5
  Recorder.log, Recorder.engine = [], engine
  a, b = Recorder("a"), Recorder("b")
  try:
    engine.submit(Request(first, 150, a))  # no stop ids: a decodes 150 tokens
    while len(a.tokens) < 5:
      assert not a.done.wait(0.01)
    engine.submit(Request(second, 5, b))
    assert b.done.wait(120) and a.done.wait(120)
  finally:
    Recorder.engine = None
  assert a.reason == "length" and len(a.tokens) == 150 and len(b.tokens) == 5
  events = Recorder.log
  b_first = events.index(("b", "token"))
  assert b_first < events.index(("a", "done"))  # b decoded while a was still running
  # While b's prompt was prefilled, a got a token after every chunk: one chunk per step.
  during = [c for c, e in zip(a.chunks_at, (e for e in events if e[0] == "a"))
            if e[1] == "token"][:sum(1 for e in events[:b_first] if e == ("a", "token"))]
  gaps = np.diff(during)
  assert gaps.max() <= 1 and gaps.sum() >= chunks
  assert generate_all(engine, [second], 5)[0] == b.tokens  # as it would be alone


def test_seeded_sampling_does_not_depend_on_the_batch(model, engine):
  prompt = _prompts(model, ["JULIET."])[0]

  def sampled(others: int):
    recs = [Recorder(f"r{i}") for i in range(others + 1)]
    for i, r in enumerate(recs):
      engine.submit(Request(prompt if i == 0 else _prompts(model, [TEXTS[i % 5]])[0], 12, r,
                            temperature=0.9, top_p=0.9, seed=7 if i == 0 else i))
    assert all(r.done.wait(120) for r in recs)
    return recs[0].tokens
  alone, crowded = sampled(0), sampled(2)
  assert alone == crowded and len(alone) == 12
  other = Recorder("x")
  engine.submit(Request(prompt, 12, other, temperature=0.9, top_p=0.9, seed=8))
  assert other.done.wait(120) and other.tokens != alone


def test_cancel_frees_the_row_and_nothing_compiled_after_start(model, engine):
  r = Recorder("c")
  req = Request(_prompts(model, ["ROMEO."])[0], 200, r)
  engine.submit(req)
  while len(r.tokens) < 2:
    assert not r.done.wait(0.01)
  req.cancel()
  assert r.done.wait(60) and r.reason == "cancelled" and len(r.tokens) < 200
  for _ in range(100):
    if engine.busy_rows() == 0:
      break
    threading.Event().wait(0.05)
  assert engine.busy_rows() == 0
  for _ in range(100):  # with no row busy the cache shrinks back to one row
    if engine._size == 1:
      break
    threading.Event().wait(0.05)
  assert engine._size == 1 and engine.phases.counts["resizes"] > 4  # it grew to 3 rows above
  # every test above: different lengths, budgets, sampling parameters and seeds
  # compiled at start-up: a prefill program per width, and a decode step and a row insert per
  # cache size (1, 2, 3 rows)
  assert engine.buckets == [1, 2, 3]
  assert engine.widths == [16, 32] and engine._prefill._cache_size() == 2  # chunks of 32
  assert engine._decode._cache_size() == 3 and engine._insert._cache_size() == 3
  assert engine._resize._cache_size() == 4  # 1 -> 2 -> 3 and back


def test_requests_that_do_not_fit_are_refused(model, engine):
  from lmjax.errors import UserError
  with pytest.raises(UserError, match="prompt has 300 tokens"):
    engine.submit(Request([1] * 300, 1, lambda e: None))
  fits = Request([1] * 256, 50, lambda e: None)  # the last new token is never fed back
  engine.submit(fits)
  assert fits.max_tokens == 1
  fits.cancel()


def test_sample_follows_each_rows_parameters():
  logits = jax.random.normal(jax.random.PRNGKey(0), (6, 50)) * 3
  keys = jax.random.split(jax.random.PRNGKey(1), 6)
  temperature = jnp.array([0.0, 1.0, 1.0, 1.0, 0.0, 5.0])
  top_p = jnp.array([1.0, 1e-6, 1.0, 1.0, 0.5, 1.0])
  top_k = jnp.array([0, 0, 1, 0, 3, 2])
  out = np.asarray(sample(logits, keys, temperature, top_p, top_k))
  best = np.asarray(jnp.argmax(logits, -1))
  assert out[0] == best[0] and out[1] == best[1] and out[2] == best[2] and out[4] == best[4]
  top2 = np.argsort(-np.asarray(logits[5]))[:2]
  draws = sample(jnp.repeat(logits[5:], 200, 0), jax.random.split(keys[0], 200),
                      jnp.full(200, 5.0), jnp.ones(200), jnp.full(200, 2))
  assert set(np.asarray(draws).tolist()) == set(top2.tolist())  # hot, but only the top 2

