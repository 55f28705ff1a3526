"""Rewards of online objectives (GRPO), as plug-ins: a function `(prompt, completion, record)
-> float`, registered under a name that `objective.rewards` lists.

    @register_reward("mentions_answer")
    def mentions_answer(prompt, completion, record):
      return float(record["answer"] in completion)

`prompt` is the record's prompt as the file gives it (text or a list of messages),
`completion` the sampled reply's text (a `Completion`, a `str` that also carries its token
ids), `record` the whole JSON object of its line, so a reward may read any field (a
reference answer, test cases). Research code registers its own in its experiment file,
which is imported before its config is read (`experiments/grpo_tiny.py`).

lmjax's own: `exact_match` (the reply equals the record's `objective.answer_field`, both
stripped), `format` (the stripped reply matches `objective.format_regex` whole), `length`
(minus the reply's tokens over `objective.max_completion_tokens`, a linear length penalty)
and `overlong` (DAPO's soft overlong punishment over the last `objective.overlong_cache`
tokens of the budget; TRL's `get_soft_overlong_punishment`).
"""

from __future__ import annotations

import math
import re
from typing import Any, Callable, Sequence

import numpy as np

from lmjax.errors import UserError

Reward = Callable[[Any, str, dict], float]
_REWARDS: dict[str, Reward] = {}
_BUILT_IN: set[str] = set()


class Completion(str):
  """A sampled reply's text; `ids` are its token ids as trained on (the end-of-turn token
  included when it stopped there, as TRL's `completion_ids`), `stopped` whether it did."""

  ids: tuple[int, ...] = ()
  stopped: bool = False

  @classmethod
  def of(cls, text: str, ids: Sequence[int], stopped: bool) -> "Completion":
    out = cls(text)
    out.ids, out.stopped = tuple(int(i) for i in ids), bool(stopped)
    return out


def register_reward(name: str) -> Callable[[Reward], Reward]:
  """Decorator: makes `fn(prompt, completion, record) -> float` the reward `name`."""
  def add(fn: Reward) -> Reward:
    if not callable(fn):
      raise TypeError(f"register_reward({name!r}) takes a function, got {fn!r}")
    if name in _BUILT_IN and _REWARDS[name] is not fn:
      raise ValueError(f"reward {name!r} is lmjax's own; register yours under another name")
    _REWARDS[name] = fn
    if getattr(fn, "__module__", "").startswith("lmjax."):
      _BUILT_IN.add(name)
    return fn
  return add


def registered_rewards() -> list[str]:
  return list(_REWARDS)


def reward_function(name: str, options: dict[str, Any]) -> Reward:
  """The reward `name`; lmjax's own get their options (`objective.*`) bound."""
  if name not in _REWARDS:
    raise UserError(f"objective.rewards: {name!r} is not a registered reward (registered: "
                    f"{', '.join(registered_rewards())}; one of your own: register_reward in "
                    "the experiment file, see experiments/grpo_tiny.py)")
  fn = _REWARDS[name]
  bound = _OPTIONS.get(name, ())
  if name in _BUILT_IN and bound:
    kwargs = {k: options[k] for k in bound}
    return lambda prompt, completion, record: fn(prompt, completion, record, **kwargs)
  return fn


def score(rewards: dict[str, Reward], prompts: Sequence[Any], completions: Sequence[str],
          records: Sequence[dict], wheres: Sequence[str]) -> np.ndarray:
  """(N, F) float32: each reward of each completion. A reward that raises, or returns
  anything but a finite number, stops the run in one line naming the record."""
  out = np.zeros((len(completions), len(rewards)), np.float32)
  for j, (name, fn) in enumerate(rewards.items()):
    for i, (prompt, completion, record) in enumerate(zip(prompts, completions, records)):
      try:
        value = fn(prompt, completion, record)
      except Exception as e:  # noqa: BLE001  (research code: any failure, named)
        raise UserError(f"{wheres[i]}: reward {name} raised {type(e).__name__}: {e}") from None
      if not isinstance(value, (int, float, np.number)) or not math.isfinite(float(value)):
        raise UserError(f"{wheres[i]}: reward {name} returned {value!r} (a finite number is "
                        f"needed) for the completion {str(completion)[:80]!r}")
      out[i, j] = float(value)
  return out


# ----------------------------------------------------------------------- lmjax's own


@register_reward("exact_match")
def exact_match(prompt: Any, completion: str, record: dict, answer_field: str) -> float:
  if answer_field not in record:
    raise KeyError(f"the record has no field {answer_field!r} (objective.answer_field)")
  return float(completion.strip() == str(record[answer_field]).strip())


@register_reward("format")
def format_match(prompt: Any, completion: str, record: dict, format_regex: str) -> float:
  return float(re.fullmatch(format_regex, completion.strip(), re.DOTALL) is not None)


@register_reward("length")
def length_penalty(prompt: Any, completion: Completion, record: dict,
                   max_completion_tokens: int) -> float:
  return -len(completion.ids) / max_completion_tokens


@register_reward("overlong")
def overlong_punishment(prompt: Any, completion: Completion, record: dict,
                        max_completion_tokens: int, overlong_cache: int) -> float:
  """DAPO's Eq. 13: 0 up to max - cache tokens, then falling linearly to -1 at max."""
  n, start = len(completion.ids), max_completion_tokens - overlong_cache
  if n <= start:
    return 0.0
  return (start - n) / overlong_cache if n <= max_completion_tokens else -1.0


_OPTIONS = {"exact_match": ("answer_field",), "format": ("format_regex",),
            "length": ("max_completion_tokens",),
            "overlong": ("max_completion_tokens", "overlong_cache")}
