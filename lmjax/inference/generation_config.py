"""A model's `generation_config.json`: its sampling defaults and end-of-sequence ids, read
as transformers' `generate` reads them.

Hugging Face checkpoints say there how they are meant to be sampled (Llama 3 instruct:
temperature 0.6, top_p 0.9; Qwen 2.5: 0.7, 0.8, top_k 20) and which ids end a reply,
often several (Llama 3: <|end_of_text|>, <|eom_id|>, <|eot_id|>; Gemma: <eos>,
<end_of_turn>). transformers samples only when `do_sample` is true, and then fills what
the file leaves out with temperature 1, top_k 50, top_p 1; without `do_sample` it is
greedy. lmjax does the same: `launch.generate` takes these as its defaults (a flag given
overrides one), `launch.serve` as the defaults of a request that leaves a field out. A file
that `save_pretrained` derived from config.json (`_from_model_config`) gives its eos ids
only: it says nothing of how to sample, so the launchers keep their own defaults.
Options lmjax's sampler does not have (repetition penalties, beams, ...) are named in one
log line and left out, never approximated.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

from lmjax.errors import UserError

FILE = "generation_config.json"
# What transformers fills in when sampling and the file leaves a field out.
HF_SAMPLING = dict(temperature=1.0, top_k=50, top_p=1.0)
# Fields whose values change the tokens, and the value at which they do nothing.
_IGNORED = dict(repetition_penalty=1.0, num_beams=1, no_repeat_ngram_size=0,
                length_penalty=1.0, min_new_tokens=0, min_length=0, typical_p=1.0,
                epsilon_cutoff=0.0, eta_cutoff=0.0, min_p=None, bad_words_ids=None,
                suppress_tokens=None, begin_suppress_tokens=None, forced_bos_token_id=None,
                forced_eos_token_id=None, sequence_bias=None)


@dataclasses.dataclass(frozen=True)
class GenerationDefaults:
  """Sampling defaults (temperature 0: greedy) and the ids that end a generation."""
  temperature: float = 0.0
  top_p: float = 1.0
  top_k: int = 0
  eos_ids: tuple[int, ...] = ()
  ignored: tuple[str, ...] = ()  # options set in the file that lmjax does not apply
  source: str = ""  # "" when no file was read

  def describe(self) -> str:
    """One line for the launchers' log."""
    how = ("greedy" if self.temperature == 0 else
           f"temperature {self.temperature:g}, top_p {self.top_p:g}, top_k {self.top_k}")
    line = f"{self.source}: {how}, eos ids {list(self.eos_ids)}"
    if self.ignored:
      line += f"; not applied (lmjax has no such option): {', '.join(self.ignored)}"
    return line


def read_file(directory: str) -> dict[str, Any]:
  """The contents of `directory`/generation_config.json, {} when there is none."""
  path = os.path.join(directory, FILE)
  if not os.path.isfile(path):
    return {}
  try:
    with open(path) as f:
      raw = json.load(f)
  except (OSError, ValueError) as e:
    raise UserError(f"{path} is not readable JSON ({e})") from None
  if not isinstance(raw, dict):
    raise UserError(f"{path} holds {type(raw).__name__}, not a JSON object")
  return raw


def _ids(value: Any, what: str) -> tuple[int, ...]:
  values = value if isinstance(value, list) else [] if value is None else [value]
  if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in values):
    raise UserError(f"{FILE}: {what} must be a token id or a list of them, got {value!r}")
  return tuple(dict.fromkeys(values))


def defaults(raw: dict[str, Any], eos: int, source: str = FILE) -> GenerationDefaults:
  """The defaults a generation_config.json's contents (`raw`, maybe {}) set; `eos` (the
  tokenizer's, -1 for none) ends a generation when the file names no eos ids, as
  transformers then takes config.json's."""
  eos_ids = _ids(raw.get("eos_token_id"), "eos_token_id") or ((eos,) if eos >= 0 else ())
  ignored = tuple(f"{k}={raw[k]!r}" for k, off in _IGNORED.items()
                  if raw.get(k) is not None and raw[k] != off)
  if raw.get("_from_model_config"):  # save_pretrained's copy of config.json's ids: no advice
    return GenerationDefaults(eos_ids=eos_ids)
  if not raw.get("do_sample"):
    return GenerationDefaults(eos_ids=eos_ids, ignored=ignored, source=source if raw else "")
  picked = {k: raw[k] if raw.get(k) is not None else v for k, v in HF_SAMPLING.items()}
  try:
    temperature, top_p, top_k = (float(picked["temperature"]), float(picked["top_p"]),
                                 int(picked["top_k"]))
  except (TypeError, ValueError):
    raise UserError(f"{FILE}: temperature, top_p and top_k must be numbers, got "
                    f"{picked}") from None
  if temperature < 0 or top_k < 0 or not 0 < top_p <= 1:
    raise UserError(f"{FILE}: temperature {temperature} and top_k {top_k} must be >= 0, "
                    f"top_p {top_p} in (0, 1]")
  return GenerationDefaults(temperature, top_p, top_k, eos_ids, ignored, source)


def for_model(source: Any) -> GenerationDefaults:
  """The defaults of a loaded `lmjax.pretrained.Pretrained` (its `generation` contents)."""
  return defaults(source.generation, source.tokenizer.special.eos)
