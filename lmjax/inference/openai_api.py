"""The OpenAI HTTP API's request and response shapes, and text-side helpers.

Requests are pydantic models: a known field of the wrong type is a 400 with the
field's name; fields lmjax does not know are ignored, as OpenAI-compatible servers
do (clients send `user`, `metadata`, ...). Sampling options lmjax cannot honour
(penalties, logit biases) are refused rather than silently dropped.
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from lmjax.inference.decoder import TOP_LOGPROBS


class StreamOptions(BaseModel):
  model_config = ConfigDict(extra="ignore")
  include_usage: bool = False  # a last chunk with the usage counts and no choices


class _Body(BaseModel):
  model_config = ConfigDict(extra="ignore")

  model: str | None = None
  temperature: float = Field(1.0, ge=0, le=2)
  top_p: float = Field(1.0, gt=0, le=1)
  top_k: int = Field(0, ge=0)  # an extension (vLLM's): 0 keeps every token
  n: int = Field(1, ge=1, le=64)
  stop: str | list[str] | None = None
  seed: int | None = Field(None, ge=0, lt=2 ** 64)
  stream: bool = False
  stream_options: StreamOptions | None = None
  presence_penalty: float = 0.0
  frequency_penalty: float = 0.0
  logit_bias: dict[str, float] | None = None

  def unsupported(self) -> str | None:
    """The first option set to something lmjax cannot honour."""
    if self.presence_penalty or self.frequency_penalty:
      return "presence_penalty and frequency_penalty are not supported (leave them at 0)"
    if self.logit_bias:
      return "logit_bias is not supported"
    return None

  def stops(self) -> list[str]:
    stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
    return [s for s in stops if s]


class Message(BaseModel):
  model_config = ConfigDict(extra="ignore")
  role: Literal["system", "user", "assistant", "developer"]
  content: str | list[dict[str, Any]]

  def text(self) -> str:
    """The content; a list of parts (OpenAI's multi-part form) must be text parts."""
    if isinstance(self.content, str):
      return self.content
    if not all(p.get("type") == "text" and isinstance(p.get("text"), str) for p in self.content):
      raise ValueError("only text content parts are supported")
    return "".join(p["text"] for p in self.content)


class ChatRequest(_Body):
  messages: list[Message] = Field(min_length=1)
  max_tokens: int | None = None
  max_completion_tokens: int | None = None
  logprobs: bool = False
  top_logprobs: int = Field(0, ge=0, le=TOP_LOGPROBS)


class CompletionRequest(_Body):
  prompt: str | list[str] | list[int] | list[list[int]]
  max_tokens: int | None = 16  # OpenAI's default
  logprobs: int | None = Field(None, ge=0, le=TOP_LOGPROBS)
  echo: bool = False


def new_id(prefix: str) -> str:
  return f"{prefix}-{uuid.uuid4().hex[:24]}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
  return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
          "total_tokens": prompt_tokens + completion_tokens}


def envelope(kind: str, rid: str, model: str, choices: list, **extra) -> dict[str, Any]:
  return {"id": rid, "object": kind, "created": int(time.time()), "model": model,
          "choices": choices, **extra}


def error_body(message: str, kind: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict[str, Any]:
  return {"error": {"message": message, "type": kind, "param": param, "code": code}}


class StopText:
  """Incremental text of a choice, cut at the first stop string. `add` returns the text
  that is safe to show: the end that could still begin a stop string is held back."""

  def __init__(self, stops: list[str]):
    self.stops, self.text, self.shown, self.stopped = stops, "", 0, False

  def add(self, text: str) -> str:
    """`text` is the whole decoded text so far."""
    self.text = text
    hits = [text.find(s) for s in self.stops if s in text]
    if hits:
      self.text, self.stopped = text[:min(hits)], True
      return self._release(len(self.text))
    hold = max([k for s in self.stops for k in range(1, len(s)) if text.endswith(s[:k])],
               default=0)
    if text.endswith("\ufffd"):  # an incomplete UTF-8 sequence: its bytes are still coming
      hold = max(hold, 1)
    return self._release(len(text) - hold)

  def finish(self) -> str:
    return self._release(len(self.text))

  def _release(self, upto: int) -> str:
    out = self.text[self.shown:max(upto, self.shown)]
    self.shown = max(upto, self.shown)
    return out
