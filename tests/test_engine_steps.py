"""The engine runs several decode steps per dispatch: rows end on the device at a stop id or
their budget, mid-dispatch, with the tokens they would get one step at a time; a new
request still gets its first token from a one-step dispatch; and the server's choices turn
a dispatch's burst of events into the text token-by-token handling gives."""

import threading

import pytest

from lmjax.inference.choice_state import ChoiceState
from lmjax.inference.engine import Engine, Request
from lmjax.inference.generate import Generator, SamplingConfig


@pytest.fixture(scope="module")
def model(decoder_model):
  return decoder_model


@pytest.fixture(scope="module")
def engine(model):
  # no time cap: every dispatch that may run 8 steps does, however busy the machine is
  engine = Engine(*model, pad=0, slots=4, chunk=16, steps_per_dispatch=8,
                  dispatch_ms=1e9).start()
  yield engine
  engine.stop()


class Events:
  """One request's events, and the engine's step count when its first token came."""

  def __init__(self, engine: Engine):
    self.engine, self.tokens, self.reason, self.done = engine, [], None, threading.Event()
    self.first_at: int | None = None

  def __call__(self, event):
    if event[0] == "token":
      if self.first_at is None:
        self.first_at = self.engine.steps
      self.tokens.append(event[1])
    elif event[0] == "done":
      self.reason = event[1]
      self.done.set()


def _run(engine: Engine, prompt, max_tokens: int, **kw) -> Events:
  events = Events(engine)
  engine.submit(Request(list(prompt), max_tokens, events, **kw))
  assert events.done.wait(120)
  return events


PROMPT = [2, 17, 33, 9, 41]


def test_rows_end_mid_dispatch_at_a_stop_id_or_their_budget(model, engine):
  greedy = Generator(*model, eos=-1, pad=0).generate([PROMPT], SamplingConfig(40))[0]
  assert len(greedy) == 40
  stop = greedy[10]  # as if it were EOS: the row ends before it, inside the second dispatch
  before = greedy[:greedy.index(stop)]
  got = _run(engine, PROMPT, 40, stop_ids=(stop,))
  assert got.tokens == before and got.reason == "stop"
  for budget in (1, 5, 13):
    got = _run(engine, PROMPT, budget)
    assert got.tokens == greedy[:budget] and got.reason == "length"


def test_several_steps_per_dispatch_and_the_first_token_after_one(model, engine):
  steps, dispatches = engine.phases.counts["steps"], engine.phases.counts["dispatches"]
  began = engine.steps
  got = _run(engine, PROMPT, 40, temperature=0.9, seed=4)
  ran = engine.phases.counts["steps"] - steps
  assert len(got.tokens) == ran == 40
  assert engine.phases.counts["dispatches"] - dispatches <= 2 + 40 // 8  # not one per step
  assert got.first_at == began + 1  # the first token came from a one-step dispatch
  sampling = SamplingConfig(40, temperature=0.9)
  assert got.tokens == Generator(*model, eos=-1, pad=0).generate([PROMPT], sampling, seed=4)[0]


def test_a_dispatch_fits_its_time_budget(model):
  slow = Engine(*model, pad=0, slots=2, chunk=16, steps_per_dispatch=8, dispatch_ms=0).start()
  try:
    got = _run(slow, PROMPT, 20, temperature=0.9, seed=4)
  finally:
    slow.stop()
  counts = slow.phases.counts  # after the first 8-step dispatch, no step fits 0 ms: one each
  assert counts["steps"] == 20 and counts["dispatches"] - len(slow.buckets) >= 20 - 8 + 1
  sampling = SamplingConfig(20, temperature=0.9)
  assert got.tokens == Generator(*model, eos=-1, pad=0).generate([PROMPT], sampling, seed=4)[0]


def test_the_cache_holds_only_the_rows_that_run(model):
  """The cache grows when a request takes a row it lacks and shrinks SHRINK_AFTER dispatches
  after the rows beyond a smaller size have ended; the rows that stay decode on unchanged."""
  from lmjax.inference.engine import SHRINK_AFTER
  engine = Engine(*model, pad=0, slots=2, chunk=16, steps_per_dispatch=1)
  long, short = Events(engine), Events(engine)
  engine.complete([Request(PROMPT, 12 + SHRINK_AFTER, long), Request(PROMPT[:3], 2, short)])
  assert engine._size == 1 and engine.phases.counts["resizes"] == 2  # 1 -> 2 -> 1
  greedy = Generator(*model, eos=-1, pad=0).generate([PROMPT, PROMPT[:3]],
                                                    SamplingConfig(12 + SHRINK_AFTER))
  assert long.tokens == greedy[0] and short.tokens == greedy[1][:2]
  both = [Events(engine), Events(engine)]  # end together: the cache keeps its 2 rows
  engine.complete([Request(PROMPT, 3, both[0]), Request(PROMPT[:3], 3, both[1])])
  assert engine._size == 2 and [e.tokens for e in both] == [g[:3] for g in greedy]
  alone = Events(engine)  # each call starts from one row: its sizes follow its requests
  engine.complete([Request(PROMPT, 3, alone)])
  assert engine._size == 1 and alone.tokens == greedy[0][:3]


class _Letters:
  """A tokenizer whose ids are letters (id 0 = 'a'), so text and tokens line up."""

  def decode(self, ids):
    return "".join(chr(ord("a") + i) for i in ids)


@pytest.mark.parametrize("stops", [[], ["cd"], ["cde", "d"], ["xyz"]])
def test_a_burst_of_events_releases_what_one_at_a_time_does(stops):
  events = [("token", i, -1.0, []) for i in (0, 1, 2, 3, 4, 5)] + [("done", "length")]
  one = ChoiceState(0, _Letters(), [9], list(stops))
  singly = "".join(one.handle([e]) for e in events if one.finish is None)
  burst = ChoiceState(0, _Letters(), [9], list(stops))
  together = burst.handle(events[:4]) + burst.handle(events[4:])
  assert together == singly and burst.finish == one.finish and burst.ids == one.ids
  assert (singly, one.finish) == {(): ("abcdef", "length"), ("cd",): ("ab", "stop"),
                                  ("cde", "d"): ("abc", "stop"),
                                  ("xyz",): ("abcdef", "length")}[tuple(stops)]
