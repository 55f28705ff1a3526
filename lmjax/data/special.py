"""The special-token ids every tokenizer names (lmjax's SentencePiece models and Hugging
Face tokenizers alike), and the file digest both identify themselves by."""

from __future__ import annotations

import dataclasses
import hashlib


@dataclasses.dataclass(frozen=True)
class SpecialTokens:
  pad: int
  unk: int
  bos: int
  eos: int
  mask: int
  cls: int
  sep: int

  @property
  def ids(self) -> tuple[int, ...]:
    """Every id that is never a prediction target nor a random MLM replacement."""
    ids = {self.pad, self.unk, self.bos, self.eos, self.mask, self.cls, self.sep}
    return tuple(sorted(i for i in ids if i >= 0))  # -1: a tokenizer without that token


def file_sha256(path: str) -> str:
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    for chunk in iter(lambda: f.read(1 << 22), b""):
      digest.update(chunk)
  return digest.hexdigest()
