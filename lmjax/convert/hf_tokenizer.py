"""A Hugging Face tokenizer (`tokenizer.json`, or BERT's `vocab.txt`) behind the interface
of lmjax's SentencePiece `Tokenizer`: encode, decode, vocab_size, special, sha256."""

from __future__ import annotations

import json
import os
from typing import Any, Sequence

import numpy as np

from lmjax.data.tokenizer import SpecialTokens, file_sha256
from lmjax.errors import UserError

FILES = ("tokenizer.json", "vocab.txt")
_CANDIDATES = {  # the first of these the vocabulary has
    "pad": ("[PAD]", "<pad>"), "unk": ("[UNK]", "<unk>"), "bos": ("<s>", "<|endoftext|>", "[CLS]"),
    "eos": ("</s>", "<|endoftext|>", "[SEP]"), "mask": ("[MASK]", "<mask>"),
    "cls": ("[CLS]", "<s>", "<|endoftext|>"), "sep": ("[SEP]", "</s>", "<|endoftext|>"),
}


def find_tokenizer_file(directory: str) -> str | None:
  for name in FILES:
    if os.path.isfile(os.path.join(directory, name)):
      return os.path.join(directory, name)
  return None


class HFTokenizer:
  """Loaded from a model directory; special ids from config.json where it names them."""

  def __init__(self, directory: str):
    import tokenizers
    path = find_tokenizer_file(directory)
    if path is None:
      raise UserError(f"{directory} has no tokenizer.json or vocab.txt")
    self.path, self.sha256 = path, file_sha256(path)
    settings = _read_json(os.path.join(directory, "tokenizer_config.json"))
    try:
      if path.endswith(".json"):
        self._tok = tokenizers.Tokenizer.from_file(path)
      else:
        lower = settings.get("do_lower_case", True)
        self._tok = tokenizers.BertWordPieceTokenizer(path, lowercase=lower)
    except Exception as e:  # the tokenizers library raises plain Exceptions
      raise UserError(f"cannot read tokenizer {path}: {str(e).splitlines()[0][:200]}") from None
    # A tokenizer.json may enable padding and truncation (sentence-transformers' do, at 128):
    # lmjax frames, packs and pads itself, so text must encode to all of its ids, unpadded.
    self._tok.no_padding()
    self._tok.no_truncation()
    config = _read_json(os.path.join(directory, "config.json"))
    self.special = self._special(config)

  def _special(self, config: dict[str, Any]) -> SpecialTokens:
    found = {}
    for name, pieces in _CANDIDATES.items():
      ids = [self._tok.token_to_id(p) for p in pieces]
      found[name] = next((i for i in ids if i is not None), -1)
    for name in ("bos", "eos", "pad"):
      value = config.get(f"{name}_token_id")
      if isinstance(value, list):
        value = value[0] if value else None
      if isinstance(value, int) and 0 <= value < self.vocab_size:
        found[name] = value
    if found["pad"] < 0:
      found["pad"] = max(found["eos"], 0)  # padding is masked out; any id will do
    return SpecialTokens(**found)

  @property
  def vocab_size(self) -> int:
    return self._tok.get_vocab_size()

  def encode(self, texts: Sequence[str], num_threads: int = -1) -> list[list[int]]:
    del num_threads
    return [e.ids for e in self._tok.encode_batch(list(texts), add_special_tokens=False)]

  def serialized(self) -> bytes:
    """The whole tokenizer as tokenizer.json bytes (WordPiece from vocab.txt included), for
    workers that rebuild it with `tokenizers.Tokenizer.from_str`."""
    inner = getattr(self._tok, "_tokenizer", self._tok)  # BertWordPieceTokenizer wraps one
    return inner.to_str().encode()

  def decode(self, ids: Sequence[int] | np.ndarray) -> str:
    return self._tok.decode([int(i) for i in ids], skip_special_tokens=True)

  def id_to_piece(self, i: int) -> str:
    return self._tok.id_to_token(int(i))


def _read_json(path: str) -> dict[str, Any]:
  if not os.path.isfile(path):
    return {}
  try:
    with open(path) as f:
      return json.load(f)
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise UserError(f"{path} is not valid JSON ({e})") from None
