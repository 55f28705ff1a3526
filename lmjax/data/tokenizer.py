"""SentencePiece tokenizers with the special tokens lmjax models rely on: the `Tokenizer`
class and its training (reading one from any source, saving and installing it:
`lmjax.data.tokenizer_io`).

Ids 0-3 are pad, unk, bos, eos; [MASK], [CLS], [SEP] and a newline piece are
user-defined symbols right after them. Byte fallback keeps every input
representable, and the identity normaliser makes decode(encode(s)) == s.
"""

from __future__ import annotations

import hashlib
import io
import os
import re
from typing import Iterable, Iterator, Sequence

import numpy as np
import sentencepiece as spm

from lmjax import paths
from lmjax.data.special import SpecialTokens
from lmjax.errors import UserError

USER_SYMBOLS = ("[MASK]", "[CLS]", "[SEP]", "\n")
_MAX_SENTENCE_BYTES = 4096  # SentencePiece silently drops longer training lines


class Tokenizer:
  """A loaded SentencePiece model: encode/decode, vocabulary size, special ids, sha256."""

  def __init__(self, path: str):
    if not paths.isfile(path):
      raise UserError(f"tokenizer file not found: {path} (train one with "
                      "`python -m launch.train_tokenizer`)")
    self.path = path
    self.data = paths.read_bytes(path)  # local or in a bucket: loaded from memory
    self.sha256 = hashlib.sha256(self.data).hexdigest()
    self._sp = spm.SentencePieceProcessor()
    try:
      self._sp.LoadFromSerializedProto(self.data)
    except (RuntimeError, OSError) as e:
      raise UserError(f"tokenizer file {path} is not a valid SentencePiece model ({e})") from None
    piece = self._sp.piece_to_id
    ids = {name: piece(sym) for name, sym in zip(("mask", "cls", "sep"), USER_SYMBOLS)}
    unk = self._sp.unk_id()
    if self._sp.pad_id() < 0 or any(i == unk for i in ids.values()):
      raise UserError(f"tokenizer {path} lacks lmjax's special tokens (<pad>, [MASK], [CLS], "
                      "[SEP]); train it with `python -m launch.train_tokenizer`")
    self.special = SpecialTokens(pad=self._sp.pad_id(), unk=unk, bos=self._sp.bos_id(),
                                 eos=self._sp.eos_id(), **ids)
    self.chat_template: str | None = None  # set by a chat run that saved one beside it
    self._controls: list[str] | None = None

  @property
  def vocab_size(self) -> int:
    return self._sp.vocab_size()

  def encode(self, texts: Sequence[str], num_threads: int = -1) -> list[list[int]]:
    return self._sp.encode(list(texts), num_threads=num_threads)

  def decode(self, ids: Sequence[int] | np.ndarray) -> str:
    return self._sp.decode([int(i) for i in ids])

  def encode_text(self, text: str) -> list[int]:
    """[bos] and the ids of `text` (control strings read as theirs): what the exported
    tokenizer.json gives for `tokenizer(text)` in transformers."""
    bos = [self.special.bos] if self.special.bos >= 0 else []
    return bos + self.encode_with_offsets(text)[0]

  def encode_with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
    """Ids of `text` in which the control pieces' strings (<s>, </s>, ...) stand for
    their ids, as a Hugging Face tokenizer reads its special tokens (lmjax's tokenizer.json
    export does the same), with each token's character span."""
    controls = [self._sp.id_to_piece(i) for i in range(self._sp.get_piece_size())
                if self._sp.is_control(i)] if self._controls is None else self._controls
    self._controls = controls
    ids: list[int] = []
    offsets: list[tuple[int, int]] = []
    at = 0
    for chunk in re.split(f"({'|'.join(map(re.escape, controls))})", text) if controls else [text]:
      if chunk in controls:
        ids.append(self._sp.piece_to_id(chunk))
        offsets.append((at, at + len(chunk)))
      elif chunk:
        chars = np.cumsum([0] + [len(c.encode("utf-8")) for c in chunk])  # byte of each char
        for piece in self._sp.encode(chunk, out_type="proto").pieces:
          lo = int(np.searchsorted(chars, piece.begin, side="right")) - 1
          hi = int(np.searchsorted(chars, piece.end, side="left"))
          ids.append(piece.id)
          offsets.append((at + lo, at + max(hi, lo)))
      at += len(chunk)
    return ids, offsets

  def id_to_piece(self, i: int) -> str:
    return self._sp.id_to_piece(int(i))


def _training_sentences(lines: Iterable[str]) -> Iterator[str]:
  """Non-empty lines, long ones cut into pieces SentencePiece will not drop."""
  for line in lines:
    line = line.rstrip("\n")
    while line:
      cut = line.encode("utf-8")[:_MAX_SENTENCE_BYTES].decode("utf-8", "ignore")
      yield cut
      line = line[len(cut):]


def train_tokenizer(lines: Iterable[str], output_path: str, vocab_size: int,
                    model_type: str = "unigram", max_sentences: int = 2_000_000,
                    seed_sentencepiece_size: int = 1_000_000,
                    character_coverage: float = 1.0,
                    extra_symbols: Sequence[str] = ()) -> Tokenizer:
  """Trains a SentencePiece model (unigram or bpe, byte fallback) and writes it atomically;
  `extra_symbols` (chat role markers) become single pieces like [MASK]."""
  if model_type not in ("unigram", "bpe"):
    raise UserError(f"model_type must be 'unigram' or 'bpe', got {model_type!r}")
  symbols = list(USER_SYMBOLS) + [s for s in extra_symbols if s not in USER_SYMBOLS]
  minimum = 256 + 4 + len(symbols) + 1  # bytes, pad/unk/bos/eos, user symbols, one piece
  if not 0.98 <= character_coverage <= 1:  # SentencePiece's own bounds
    raise UserError(f"character_coverage must be in [0.98, 1], got {character_coverage}")
  if vocab_size < minimum:
    raise UserError(f"vocab_size must be at least {minimum} with byte fallback, got {vocab_size}")
  model = io.BytesIO()
  try:
    spm.SentencePieceTrainer.train(
        sentence_iterator=_training_sentences(lines), model_writer=model,
        vocab_size=vocab_size, model_type=model_type, byte_fallback=True,
        pad_id=0, unk_id=1, bos_id=2, eos_id=3, user_defined_symbols=symbols,
        normalization_rule_name="identity", remove_extra_whitespaces=False,
        character_coverage=character_coverage, split_digits=True, input_sentence_size=max_sentences,
        shuffle_input_sentence=True, seed_sentencepiece_size=seed_sentencepiece_size,
        max_sentence_length=_MAX_SENTENCE_BYTES * 2, num_threads=os.cpu_count() or 1,
        minloglevel=2)
  except RuntimeError as e:
    raise UserError(f"tokenizer training failed: {e}") from None
  try:
    paths.makedirs(paths.dirname(paths.resolve(output_path)))
    paths.write_atomic(output_path, model.getvalue())
  except OSError as e:
    raise UserError(f"cannot write {output_path} ({e.strerror or e})") from None
  return Tokenizer(output_path)
