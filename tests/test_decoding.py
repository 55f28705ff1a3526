"""One decoder: the sampler keeps what transformers' warpers keep (temperature, top-k, then
top-p on what top-k kept), and the same logits and seeds give the same tokens through every
path: `Generator.generate` (launch.generate), `Generator.stream` (--interactive, --chat) and
the serving `Engine` (launch.serve)."""

import itertools
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lmjax.inference.decoder import _top_k_top_p, sample, seed_keys, token_logprobs
from lmjax.inference.engine import Engine, Request
from lmjax.inference.generate import Generator, SamplingConfig


def _warped(logits: np.ndarray, temperature: float, top_k: int, top_p: float) -> np.ndarray:
  """transformers' own filtering of (S, V) logits, in the order its `generate` applies it."""
  import torch
  from transformers.generation.logits_process import (TemperatureLogitsWarper,
                                                       TopKLogitsWarper, TopPLogitsWarper)
  scores = torch.tensor(logits)
  scores = TemperatureLogitsWarper(temperature)(None, scores)
  if top_k:
    scores = TopKLogitsWarper(top_k)(None, scores)
  if top_p < 1:
    scores = TopPLogitsWarper(top_p)(None, scores)
  return scores.numpy()


@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, 3, 0.5), (0.7, 10, 0.9),
                                                     (1.3, 0, 0.8), (1.0, 5, 1.0),
                                                     (2.0, 40, 0.3), (1.0, 1, 0.9)])
def test_the_kept_tokens_are_transformers(temperature, top_k, top_p):
  logits = np.asarray(jax.random.normal(jax.random.PRNGKey(3), (16, 50)) * 2.5)
  rows = logits.shape[0]
  ours = _top_k_top_p(jnp.asarray(logits) / temperature, jnp.full(rows, top_p),
                      jnp.full(rows, top_k))
  np.testing.assert_array_equal(np.isfinite(np.asarray(ours)),
                                np.isfinite(_warped(logits, temperature, top_k, top_p)))


def test_top_p_applies_to_the_top_k_renormalised_distribution():
  # top-2 renormalised: 0.57, 0.43, so top_p 0.5 keeps token 0 only; top-p on the unfiltered
  # distribution (0.4 + 0.3 before 0.5) would keep tokens 0 and 1.
  logits = jnp.log(jnp.array([[0.4, 0.3, 0.2, 0.1]] * 500))
  drawn = sample(logits, jnp.asarray(seed_keys(range(500))), jnp.ones(500), jnp.full(500, 0.5),
                 jnp.full(500, 2))
  assert set(np.asarray(drawn).tolist()) == {0}


def test_a_rows_draw_does_not_depend_on_the_other_rows():
  logits = jax.random.normal(jax.random.PRNGKey(0), (6, 50)) * 3
  keys = jnp.asarray(seed_keys(range(6)))
  mixed = sample(logits, keys, jnp.array([1.0, 0.0, 1.0, 0.5, 1.0, 1.0]),
                 jnp.array([1.0, 1.0, 0.5, 1.0, 0.9, 1.0]), jnp.array([0, 0, 0, 4, 3, 0]))
  for i in range(6):  # each row alone, with its own parameters, draws what it drew in the batch
    one = lambda a: a[i:i + 1]
    alone = sample(one(logits), one(keys), *(one(x) for x in (
        jnp.array([1.0, 0.0, 1.0, 0.5, 1.0, 1.0]), jnp.array([1.0, 1.0, 0.5, 1.0, 0.9, 1.0]),
        jnp.array([0, 0, 0, 4, 3, 0]))))
    assert int(alone[0]) == int(mixed[i]), i
  assert int(mixed[1]) == int(jnp.argmax(logits[1]))


def test_token_logprobs_are_log_softmax():
  logits = jax.random.normal(jax.random.PRNGKey(1), (4, 30)) * 4
  chosen = jnp.array([0, 5, 29, 7])
  lp, top_ids, top_lp = token_logprobs(logits, chosen)
  want = jax.nn.log_softmax(logits)
  np.testing.assert_allclose(lp, want[jnp.arange(4), chosen], atol=1e-6)
  np.testing.assert_allclose(top_lp, jnp.take_along_axis(want, top_ids, -1), atol=1e-6)
  np.testing.assert_array_equal(top_ids[:, 0], jnp.argmax(logits, -1))


@pytest.fixture(scope="module")
def model(decoder_model):
  return decoder_model


@pytest.fixture(scope="module")
def engine(model):
  engine = Engine(*model, pad=0, slots=4, chunk=16).start()
  yield engine
  engine.stop()


def _engine_tokens(engine: Engine, prompt: list[int], sampling: SamplingConfig,
                   seeds: list[int]) -> list[list[int]]:
  outs = [[] for _ in seeds]
  done = [threading.Event() for _ in seeds]
  for k, seed in enumerate(seeds):
    def emit(event, k=k):
      if event[0] == "token":
        outs[k].append(event[1])
      elif event[0] == "done":
        done[k].set()
    engine.submit(Request(list(prompt), sampling.max_new_tokens, emit,
                          temperature=sampling.temperature, top_p=sampling.top_p,
                          top_k=sampling.top_k, seed=seed, stop_ids=(3,)))
  assert all(d.wait(120) for d in done)
  return outs


@pytest.mark.parametrize("sampling", [
    SamplingConfig(max_new_tokens=24, temperature=1.0, top_k=6, top_p=0.6),
    SamplingConfig(max_new_tokens=24, temperature=0.8, top_p=0.9),
    SamplingConfig(max_new_tokens=24, temperature=1.5, top_k=4),
    SamplingConfig(max_new_tokens=24, temperature=1.0)], ids=["k+p", "p", "k", "plain"])
def test_every_path_samples_the_same_tokens(model, engine, sampling):
  prompt = [2, 17, 33, 9, 41, 12, 5]
  generator = Generator(*model, eos=3, pad=0)
  served = _engine_tokens(engine, prompt, sampling, [11, 12, 13])  # n=3, seed 11
  batch = generator.generate([prompt] * 3, sampling, seed=11)  # --num_samples 3 --seed 11
  streamed = list(generator.stream(prompt, sampling, seed=11))
  assert served == batch and streamed == batch[0]
  assert len({tuple(b) for b in batch}) > 1 and max(map(len, batch)) > 5


def test_a_request_taking_a_row_below_running_rows_decodes_as_alone(model, engine):
  """Row 0 freed while rows 1 and 2 run: the request that takes it is prefilled, then
  decoded in batches that span the running rows, and must start from its own logits.
  Whether rows 1 and 2 were still running when it decoded is read from the order of the
  events afterwards (on a loaded machine they may finish first: then the scenario is
  tried again, up to 5 times)."""
  sampling = SamplingConfig(max_new_tokens=12, temperature=0.0)
  prompt = [2, 17, 33, 9]
  want = Generator(*model, eos=3, pad=0).generate([prompt], sampling)[0]

  def wait_for(kind, k):
    deadline = time.monotonic() + 120
    while not any(e[1] == kind for e in events[k]):
      assert time.monotonic() < deadline, (kind, k)
      time.sleep(0.005)

  for _ in range(5):
    order, events = itertools.count(), [[] for _ in range(4)]
    emit = lambda k: (lambda e: events[k].append(
        (next(order), e[0], e[1] if e[0] == "token" else None)))
    requests = [Request([2, 40 + i, 50 + i], 60, emit(i)) for i in range(3)]
    for r in requests:
      engine.submit(r)
    wait_for("token", 0)
    requests[0].cancel()
    wait_for("done", 0)
    engine.submit(Request(list(prompt), sampling.max_new_tokens, emit(3), temperature=0.0,
                          stop_ids=(3,)))
    wait_for("done", 3)
    for r in requests[1:]:
      r.cancel()
    assert [t for _, kind, t in events[3] if kind == "token"] == want
    first = min(n for n, kind, _ in events[3] if kind == "token")
    ended = [min([n for n, kind, _ in events[k] if kind == "done"] or [float("inf")])
             for k in (1, 2)]
    if min(ended) > first:  # rows 1 and 2 were running when it decoded: the case is tested
      return
  raise AssertionError("rows 1 and 2 finished before the new request decoded, 5 times")
