"""One choice of an API request as the engine's events arrive: its tokens, its text (cut at
stop strings), its log-probabilities and its end; and the inbox that hands the events from
the engine's thread to the server's event loop, one wake-up per batch of them."""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any

from lmjax.inference import openai_api as api


class Inbox:
  """Events put by the engine thread, taken by the event loop in batches: the loop is woken
  once per batch (a dispatch's tokens of one row), not once per event."""

  def __init__(self, loop: asyncio.AbstractEventLoop):
    self.loop, self.items, self.lock, self.ready = loop, [], threading.Lock(), asyncio.Event()

  def put(self, event: tuple) -> None:
    """From any thread; the event is stamped with the time it was put (for the profile)."""
    with self.lock:
      self.items.append((time.perf_counter(), event))
      first = len(self.items) == 1
    if first:  # the batch's first event wakes the loop; the others ride along
      self.loop.call_soon_threadsafe(self.ready.set)

  async def take(self) -> list[tuple[float, tuple]]:
    """Every event put since the last take (at least one), with its time."""
    while True:
      await self.ready.wait()
      with self.lock:
        items, self.items = self.items, []
        self.ready.clear()
      if items:
        return items


class ChoiceState:
  """One choice's tokens, text (cut at stop strings), log-probabilities and end."""

  def __init__(self, index: int, tokenizer: Any, prompt: list[int], stops: list[str]):
    self.index, self.tokenizer, self.prompt = index, tokenizer, prompt
    self.ids: list[int] = []
    self.logprobs: list[tuple[float, list]] = []
    self.prompt_logprobs: tuple[list, list] | None = None
    self.text = api.StopText(stops)
    self.finish: str | None = None

  def handle(self, events: list[tuple]) -> str:
    """Engine events, in order -> the text they release. Without stop strings a batch's
    tokens are decoded once; with them, token by token, so that the text ends where the
    first stop string is completed. Events after the end are ignored."""
    out, pending = [], False
    for event in events:
      if self.finish is not None:
        break
      if event[0] == "token":
        self.ids.append(event[1])
        self.logprobs.append((event[2], event[3]))
        pending = not self.text.stops
        if self.text.stops:
          out.append(self._release())
      elif event[0] == "prompt":
        self.prompt_logprobs = (event[1], event[2])
      else:  # ("done", reason)
        if pending:
          out.append(self._release())
          pending = False
        self.finish = event[1]
        out.append(self.text.finish())
    if pending:
      out.append(self._release())
    return "".join(out)

  def _release(self) -> str:
    out = self.text.add(self.tokenizer.decode(self.ids))
    if self.text.stopped:
      self.finish = "stop"
    return out
