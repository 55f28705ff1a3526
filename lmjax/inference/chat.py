"""Conversations with a chat model: the template applied, replies ending at the end-of-turn
marker, the conversation kept within the model's length."""

from __future__ import annotations

from typing import Any, Iterator, Sequence

from lmjax.data import chat
from lmjax.errors import UserError
from lmjax.inference import generation_config
from lmjax.inference.generate import Generator, SamplingConfig


class ChatSession:
  """A loaded model (`lmjax.pretrained.Pretrained`) answering in turns."""

  def __init__(self, source: Any, template_path: str = ""):
    self.tokenizer = source.tokenizer
    self.template = chat.load_template(self.tokenizer, template_path)
    self.end_of_turn = self.template.end_of_turn(self.tokenizer)
    # a reply also ends at the model's eos ids (generation_config.json's, often several)
    stops = (self.end_of_turn, *generation_config.for_model(source).eos_ids)
    self.generator = Generator(source.model, source.params, eos=stops,
                               pad=max(self.tokenizer.special.pad, 0))
    self.max_len = source.model.max_len

  def prompt_ids(self, messages: Sequence[dict[str, str]], max_new_tokens: int) -> list[int]:
    """The conversation with the generation prompt, its oldest turns (after a system
    message) dropped until it leaves room for `max_new_tokens`."""
    messages = list(messages)
    system = messages[:1] if messages and messages[0]["role"] == "system" else []
    turns = messages[len(system):]
    while True:
      text = self.template.render(system + turns, add_generation_prompt=True)
      ids, _ = self.tokenizer.encode_with_offsets(text)
      if len(ids) + max_new_tokens <= self.max_len:
        return ids
      later = [i for i, m in enumerate(turns) if m["role"] == "user" and i > 0]
      if not later:
        raise UserError(f"the last message takes {len(ids)} tokens; with max_new_tokens="
                        f"{max_new_tokens} the model's max_len={self.max_len} has no room")
      turns = turns[later[0]:]

  def reply(self, messages: Sequence[dict[str, str]], sampling: SamplingConfig,
            seed: int = 0) -> Iterator[int]:
    """The reply's token ids as they are produced, without the end-of-turn marker."""
    yield from self.generator.stream(self.prompt_ids(messages, sampling.max_new_tokens),
                                     sampling, seed)
