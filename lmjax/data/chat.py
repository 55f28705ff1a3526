"""Conversations for chat fine-tuning: JSON lines, chat templates, assistant-only masks, packing.

Inputs are JSON lines in the two forms the field uses:
  {"messages": [{"role": "system" | "user" | "assistant", "content": "..."}, ...]}
  {"prompt": ..., "completion": ...}  (text, or message lists as TRL's conversational form)

A conversation is rendered by a chat template, a Jinja template with the semantics of
Hugging Face's `chat_template`: the same sandboxed environment (trim_blocks,
lstrip_blocks, loop controls, `raise_exception`, `tojson`, `strftime_now`), the same
variables (`messages`, `add_generation_prompt`, `bos_token`, `eos_token`, ...) and the
`{% generation %}` tag that marks the assistant's part. The rendered text is tokenized
whole, as `tokenizer.apply_chat_template(messages, tokenize=True)` does, so the ids of
a Hugging Face tokenizer are transformers' own.

The loss covers the assistant's tokens: where the template marks them with
`{% generation %}`, exactly those; otherwise, for each assistant turn, what rendering
the conversation through that turn adds to rendering it up to there with the
generation prompt (the content and its end-of-turn marker). A token is an
assistant token when it holds a character of such a span (transformers' rule).
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import json
import os
import re
from datetime import datetime
from typing import Any, Sequence

import numpy as np

from lmjax.data.jsonl import read_json_lines
from lmjax.errors import UserError

ROLES = ("system", "user", "assistant")
TRUNCATION = ("off", "drop", "newest")

# lmjax's own template: [bos] then each turn as <|role|>\n content; an assistant turn ends
# with the eos token, so generation stops at the end of a reply with no extra marker.
DEFAULT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\n' }}"
    "{% if message['role'] == 'assistant' %}"
    "{% generation %}{{ message['content'] + eos_token }}{% endgeneration %}"
    "{% else %}{{ message['content'] + '\n' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}")
ROLE_MARKERS = tuple(f"<|{role}|>" for role in ROLES)  # reservable as atomic pieces

_GENERATION = re.compile(r"\{%-?\s*generation\s*-?%\}")


# ----------------------------------------------------------------------------- templates


def _environment():
  """Jinja as transformers sets it up for chat templates (utils/chat_template_utils.py)."""
  import jinja2
  import jinja2.ext
  from jinja2.sandbox import ImmutableSandboxedEnvironment

  class GenerationTracker(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}`: records the character span it renders."""
    tags = {"generation"}

    def __init__(self, environment):
      super().__init__(environment)
      self.spans: contextvars.ContextVar = contextvars.ContextVar("spans", default=None)
      environment.extend(track_generation=self.track)

    def parse(self, parser):
      lineno = next(parser.stream).lineno
      body = parser.parse_statements(["name:endgeneration"], drop_needle=True)
      return jinja2.nodes.CallBlock(self.call_method("_mark"), [], [], body).set_lineno(lineno)

    def _mark(self, caller):
      text = caller()
      tracking = self.spans.get()
      if tracking is not None:
        blocks, spans = tracking
        start = len("".join(blocks))
        spans.append((start, start + len(text)))
      return text

    @contextlib.contextmanager
    def track(self, blocks: list[str], spans: list[tuple[int, int]]):
      token = self.spans.set((blocks, spans))
      try:
        yield
      finally:
        self.spans.reset(token)

  def raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)

  def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)

  env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                      extensions=[GenerationTracker, jinja2.ext.loopcontrols])
  env.filters["tojson"] = tojson
  env.globals["raise_exception"] = raise_exception
  env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
  return env


class ChatTemplate:
  """A compiled chat template and the special-token strings it is rendered with."""

  def __init__(self, text: str, source: str, special: dict[str, str]):
    import jinja2
    self.text, self.source, self.special = text, source, special
    self.marks_generation = bool(_GENERATION.search(text))
    try:
      self._template = _environment().from_string(text)
    except jinja2.TemplateError as e:
      raise UserError(f"chat template {source} does not compile: {e}") from None

  def render(self, messages: Sequence[dict[str, Any]], add_generation_prompt: bool = False,
             where: str = "") -> str:
    return self._render(messages, add_generation_prompt, where)[0]

  def _render(self, messages, add_generation_prompt, where):
    import jinja2
    blocks: list[str] = []
    spans: list[tuple[int, int]] = []
    try:
      with self._template.environment.track_generation(blocks, spans):
        for block in self._template.generate(messages=list(messages),
                                             add_generation_prompt=add_generation_prompt,
                                             **self.special):
          blocks.append(block)
    except (jinja2.TemplateError, TypeError, KeyError, ValueError) as e:
      raise UserError(f"{where or 'a conversation'}: chat template {self.source} failed to "
                      f"render ({type(e).__name__}: {e})") from None
    return "".join(blocks), spans

  def assistant_spans(self, messages: Sequence[dict[str, Any]], where: str = ""
                      ) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character spans the loss covers."""
    text, spans = self._render(messages, False, where)
    if self.marks_generation:
      return text, spans
    spans = []
    for i, message in enumerate(messages):
      if message["role"] != "assistant":
        continue
      before = self.render(messages[:i], True, where)
      through = self.render(messages[:i + 1], False, where)
      if not (text.startswith(through) and through.startswith(before)):
        raise UserError(f"{where}: chat template {self.source} renders a conversation's "
                        "beginning differently from the whole; mark the assistant's part "
                        "with {% generation %} ... {% endgeneration %}")
      spans.append((len(before), len(through)))
    return text, spans

  def end_of_turn(self, tokenizer: Any) -> int:
    """The token that ends an assistant reply: the first one the template renders after
    the reply's content."""
    probe = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yes"}]
    text = self.render(probe)
    tail = text[text.rindex("Yes") + len("Yes"):]
    ids, _ = tokenizer.encode_with_offsets(tail)
    if not ids:
      return tokenizer.special.eos
    return ids[0]


def special_strings(tokenizer: Any) -> dict[str, str]:
  """bos_token, eos_token, unk_token, pad_token as the template sees them."""
  names = {"bos_token": "bos", "eos_token": "eos", "unk_token": "unk", "pad_token": "pad"}
  out = {}
  for key, field in names.items():
    i = getattr(tokenizer.special, field)
    out[key] = tokenizer.id_to_piece(i) if i >= 0 else ""
  return {**out, **getattr(tokenizer, "template_tokens", {})}  # a HF tokenizer_config's


def load_template(tokenizer: Any, path: str = "") -> ChatTemplate:
  """The template at `path` (a .jinja file), else the tokenizer's own (a Hugging Face
  directory's, or the one an lmjax chat run saved), else lmjax's default."""
  special = special_strings(tokenizer)
  if path:
    if not os.path.isfile(path):
      raise UserError(f"chat template file not found: {path}")
    with open(path, encoding="utf-8") as f:
      return ChatTemplate(f.read(), path, special)
  own = getattr(tokenizer, "chat_template", None)
  if own:
    return ChatTemplate(own, f"of {getattr(tokenizer, 'path', 'the tokenizer')}", special)
  return ChatTemplate(DEFAULT_TEMPLATE, "(lmjax default)", special)


# ----------------------------------------------------------------------------- records


@dataclasses.dataclass(frozen=True)
class Conversation:
  """One record: its messages, and where the loss starts for text prompt/completion."""

  where: str  # path:line
  messages: tuple[dict[str, str], ...] = ()
  prompt_text: str = ""  # prompt/completion as text: no template, loss on the completion
  completion_text: str = ""


def check_messages(messages: Any, where: str, need_assistant: bool = True
                   ) -> tuple[dict[str, str], ...]:
  if not isinstance(messages, list) or not messages:
    raise UserError(f"{where}: expected a non-empty list of messages")
  out = []
  for i, m in enumerate(messages):
    if not isinstance(m, dict) or "role" not in m or "content" not in m:
      raise UserError(f"{where}: message {i + 1} needs a 'role' and a 'content'")
    if m["role"] not in ROLES:
      raise UserError(f"{where}: message {i + 1} has role {m['role']!r} (known: "
                      f"{', '.join(ROLES)})")
    if not isinstance(m["content"], str):
      raise UserError(f"{where}: message {i + 1}'s content must be text")
    if m["role"] == "assistant" and not m["content"].strip():
      raise UserError(f"{where}: message {i + 1} is an empty assistant turn")
    out.append({"role": m["role"], "content": m["content"]})
  if need_assistant and not any(m["role"] == "assistant" for m in out):
    raise UserError(f"{where}: the conversation has no assistant turn (nothing to learn)")
  return tuple(out)


def read_conversations(path: str) -> list[Conversation]:
  out = []
  for where, record in read_json_lines(path):
    if "messages" in record:
      out.append(Conversation(where, check_messages(record["messages"], where)))
    elif "prompt" in record and "completion" in record:
      prompt, completion = record["prompt"], record["completion"]
      if isinstance(prompt, str) and isinstance(completion, str):
        if not completion.strip():
          raise UserError(f"{where}: the completion is empty")
        out.append(Conversation(where, prompt_text=prompt, completion_text=completion))
      else:
        prompt = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
        completion = ([{"role": "assistant", "content": completion}]
                      if isinstance(completion, str) else completion)
        both = check_messages(list(prompt) + list(completion), where)
        out.append(Conversation(where, both))
    else:
      raise UserError(f"{where}: expected 'messages', or 'prompt' and 'completion'")
  if not out:
    raise UserError(f"{path}: no conversations")
  return out


# ----------------------------------------------------------------------------- tokens


def token_mask(offsets: Sequence[tuple[int, int]], spans: Sequence[tuple[int, int]]
               ) -> np.ndarray:
  """Per token: whether it holds a character of a span (from the token holding the span's
  first character to the one holding its last, as transformers' assistant mask)."""
  mask = np.zeros(len(offsets), bool)
  ends = np.array([e for _, e in offsets]) if offsets else np.zeros(0, int)
  starts = np.array([s for s, _ in offsets]) if offsets else np.zeros(0, int)
  for lo, hi in spans:
    if hi <= lo:
      continue
    inside = np.flatnonzero((ends > lo) & (starts < hi))
    if inside.size:
      mask[inside[0]:inside[-1] + 1] = True
  return mask


def encode(conv: Conversation, tokenizer: Any, template: ChatTemplate
           ) -> tuple[list[int], np.ndarray]:
  """(ids, loss mask) of a whole conversation."""
  if not conv.messages:  # prompt/completion text, eos-ended: the loss from where the ids of
    # prompt + completion leave the prompt's (TRL's completion mask)
    eos = special_strings(tokenizer)["eos_token"]
    completion = conv.completion_text
    completion += "" if completion.endswith(eos) else eos
    prompt = tokenizer.encode_text(conv.prompt_text)
    ids = tokenizer.encode_text(conv.prompt_text + completion)
    mask = np.zeros(len(ids), bool)
    mask[_common_prefix(prompt, ids):] = True
    return ids, mask
  text, spans = template.assistant_spans(conv.messages, conv.where)
  ids, offsets = tokenizer.encode_with_offsets(text)
  return ids, token_mask(offsets, spans)


def fit(conv: Conversation, tokenizer: Any, template: ChatTemplate, seq_len: int,
        truncation: str) -> tuple[list[int], np.ndarray, bool] | None:
  """(ids, loss mask, whether turns were cut) if the conversation fits in `seq_len`; else
  per `truncation`: an error (off), None (drop), or its newest turns that fit, ending at
  an assistant turn (None if none do)."""
  ids, mask = encode(conv, tokenizer, template)
  if len(ids) <= seq_len:
    return ids, mask, False
  if truncation == "off":
    raise UserError(f"{conv.where}: {len(ids)} tokens, longer than data.seq_len={seq_len} "
                    "(set objective.truncation=drop or newest)")
  if truncation == "drop" or not conv.messages:
    return None
  system = [m for m in conv.messages[:1] if m["role"] == "system"]
  turns = conv.messages[len(system):]
  ends = [i for i, m in enumerate(turns) if m["role"] == "assistant"]
  for end in reversed(ends):  # the newest ending first, then as much context as fits
    for start in range(end + 1):
      if turns[start]["role"] != "user" and start != end:
        continue
      cut = dataclasses.replace(conv, messages=tuple(system) + turns[start:end + 1])
      ids, mask = encode(cut, tokenizer, template)
      if len(ids) <= seq_len:
        return ids, mask, True
  return None


@dataclasses.dataclass
class Packed:
  """Conversations packed several per row: (R, T) arrays and how full the rows are."""

  arrays: dict[str, np.ndarray]
  conversations: int
  dropped: int  # longer than a row (truncation drop, or newest with nothing that fits)
  cut: int  # kept only their newest turns

  @property
  def real_share(self) -> float:
    return float((self.arrays["segment_ids"] > 0).mean())

  @property
  def loss_share(self) -> float:
    return float(self.arrays["loss_mask"].mean())


def pack(sequences: Sequence[tuple[list[int], np.ndarray]], seq_len: int, pad: int,
         per_row: int = 0, window: int = 64) -> dict[str, np.ndarray]:
  """Sequences (each <= seq_len) into rows: each goes to the first of the newest `window`
  rows it fits in, else a new row (first fit, deterministic, linear in the sequences);
  `per_row` > 0 caps the sequences in a row (1 = unpacked)."""
  rows: list[list[tuple[list[int], np.ndarray]]] = []
  used: list[int] = []
  for ids, mask in sequences:
    for r in range(max(len(rows) - window, 0), len(rows)):
      if used[r] + len(ids) <= seq_len and not (per_row and len(rows[r]) >= per_row):
        break
    else:
      rows.append([])
      used.append(0)
      r = len(rows) - 1
    rows[r].append((ids, mask))
    used[r] += len(ids)
  rows = [r for r in rows if r]
  out = {k: np.zeros((len(rows), seq_len), np.int32)
         for k in ("tokens", "segment_ids", "positions", "loss_mask")}
  out["tokens"][:] = pad
  for r, row in enumerate(rows):
    at = 0
    for s, (ids, mask) in enumerate(row, 1):
      n = len(ids)
      out["tokens"][r, at:at + n] = ids
      out["segment_ids"][r, at:at + n] = s
      out["positions"][r, at:at + n] = np.arange(n)
      out["loss_mask"][r, at:at + n] = mask
      at += n
  return out


def pack_conversations(path: str, tokenizer: Any, template: ChatTemplate, seq_len: int,
                       truncation: str, per_row: int = 0) -> Packed:
  """A file's conversations, fitted to `seq_len` and packed into rows."""
  convs = read_conversations(path)
  fitted, dropped, cut = [], 0, 0
  for conv in convs:
    got = fit(conv, tokenizer, template, seq_len, truncation)
    if got is None:
      dropped += 1
      continue
    cut += got[2]
    fitted.append(got[:2])
  if not fitted:
    raise UserError(f"{path}: no conversation fits in data.seq_len={seq_len}")
  return Packed(pack(fitted, seq_len, max(tokenizer.special.pad, 0), per_row), len(convs),
                dropped, cut)


# ----------------------------------------------------------------------------- preferences


@dataclasses.dataclass(frozen=True)
class Preference:
  """A prompt with a preferred and a dispreferred completion (text, or messages)."""

  where: str
  prompt: Any
  chosen: Any
  rejected: Any

  @property
  def conversational(self) -> bool:
    return isinstance(self.chosen, tuple)


def read_preferences(path: str) -> list[Preference]:
  """Records with `chosen` and `rejected` (text or message lists) and a `prompt` (text or
  messages), or no prompt: then the turns chosen and rejected share are the prompt, as
  TRL's `extract_prompt` takes it."""
  out = []
  for where, record in read_json_lines(path):
    if "chosen" not in record or "rejected" not in record:
      raise UserError(f"{where}: expected 'chosen' and 'rejected' (and a 'prompt')")
    prompt, chosen, rejected = record.get("prompt"), record["chosen"], record["rejected"]
    if isinstance(chosen, list) != isinstance(rejected, list):
      raise UserError(f"{where}: 'chosen' and 'rejected' must both be text or both messages")
    if isinstance(chosen, list):
      if prompt is None:
        shared = 0
        while (shared < min(len(chosen), len(rejected)) - 1
               and chosen[shared] == rejected[shared]):
          shared += 1
        prompt, chosen, rejected = chosen[:shared], chosen[shared:], rejected[shared:]
      prompt = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
      prompt = check_messages(prompt, where, need_assistant=False)
      chosen = check_messages(chosen, where + " (chosen)")
      rejected = check_messages(rejected, where + " (rejected)")
    elif not (isinstance(prompt, str) and isinstance(chosen, str) and isinstance(rejected, str)):
      raise UserError(f"{where}: text 'chosen' and 'rejected' need a text 'prompt'")
    elif not chosen.strip() or not rejected.strip():
      raise UserError(f"{where}: an empty completion")
    if chosen == rejected:
      raise UserError(f"{where}: 'chosen' equals 'rejected' (nothing to prefer)")
    out.append(Preference(where, prompt, chosen, rejected))
  if not out:
    raise UserError(f"{path}: no preference pairs")
  return out


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
  n = 0
  while n < min(len(a), len(b)) and a[n] == b[n]:
    n += 1
  return n


def encode_preference(pref: Preference, tokenizer: Any, template: ChatTemplate
                      ) -> tuple[tuple[list[int], np.ndarray], tuple[list[int], np.ndarray]]:
  """((ids, completion mask) of prompt + chosen, the same of prompt + rejected), tokenized
  as TRL's DPOTrainer does: each whole, the completion where it leaves the prompt's ids."""
  if pref.conversational:
    ids = lambda messages, gen=False: tokenizer.encode_with_offsets(
        template.render(messages, gen, pref.where))[0]
    prompt = ids(pref.prompt, True)
    both = [ids(pref.prompt + side) for side in (pref.chosen, pref.rejected)]
  else:  # text: the eos token ends each completion (TRL adds it to the text)
    eos = special_strings(tokenizer)["eos_token"]
    ended = [c if c.endswith(eos) else c + eos for c in (pref.chosen, pref.rejected)]
    prompt = tokenizer.encode_text(pref.prompt)
    both = [tokenizer.encode_text(pref.prompt + c) for c in ended]
  start = min(_common_prefix(prompt, side) for side in both)
  out = []
  for side in both:
    mask = np.zeros(len(side), bool)
    mask[start:] = True
    out.append((side, mask))
  return out[0], out[1]


def preference_rows(path: str, tokenizer: Any, template: ChatTemplate, seq_len: int,
                    truncation: str) -> Packed:
  """A file's pairs as rows `chosen_*` and `rejected_*` (one pair per row each)."""
  pairs = read_preferences(path)
  kept, dropped = [], 0
  for pref in pairs:
    chosen, rejected = encode_preference(pref, tokenizer, template)
    longest = max(len(chosen[0]), len(rejected[0]))
    if longest > seq_len:
      if truncation == "off":
        raise UserError(f"{pref.where}: {longest} tokens, longer than data.seq_len={seq_len} "
                        "(set objective.truncation=drop)")
      dropped += 1
      continue
    kept.append((chosen, rejected))
  if not kept:
    raise UserError(f"{path}: no preference pair fits in data.seq_len={seq_len}")
  pad = max(tokenizer.special.pad, 0)
  arrays = {}
  for i, side in enumerate(("chosen", "rejected")):
    rows = pack([pair[i] for pair in kept], seq_len, pad, per_row=1)
    arrays.update({f"{side}_{k}": v for k, v in rows.items()})
  return Packed(arrays, len(pairs), dropped, 0)
