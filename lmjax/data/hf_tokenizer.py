"""A Hugging Face tokenizer (`tokenizer.json`, or BERT's `vocab.txt`) behind the interface
of lmjax's SentencePiece `Tokenizer`: encode, decode, vocab_size, special, sha256."""

from __future__ import annotations

import json
import os
from typing import Any, Sequence

import numpy as np

from lmjax.data.special import SpecialTokens, file_sha256
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
    settings = read_json(os.path.join(directory, "tokenizer_config.json"))
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
    config = read_json(os.path.join(directory, "config.json"))
    self.special = self._special(config)
    self.chat_template = read_chat_template(directory, settings)
    # The special-token strings a chat template sees, as transformers' special_tokens_map
    named = {k: settings.get(k) for k in ("bos_token", "eos_token", "unk_token", "pad_token")}
    self.template_tokens = {k: v.get("content") if isinstance(v, dict) else v
                            for k, v in named.items() if v is not None}

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

  def encode_text(self, text: str) -> list[int]:
    """The ids of `tokenizer(text)` in transformers: special tokens added as it adds them."""
    return list(self._tok.encode(text).ids)

  def encode_with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
    """Ids of `text` (special tokens written in it read as theirs, none added) and each
    token's character span: what `apply_chat_template(..., tokenize=True)` tokenizes."""
    enc = self._tok.encode(text, add_special_tokens=False)
    return list(enc.ids), [tuple(o) for o in enc.offsets]

  def serialized(self) -> bytes:
    """The whole tokenizer as tokenizer.json bytes (WordPiece from vocab.txt included), for
    workers that rebuild it with `tokenizers.Tokenizer.from_str`."""
    inner = getattr(self._tok, "_tokenizer", self._tok)  # BertWordPieceTokenizer wraps one
    return inner.to_str().encode()

  def decode(self, ids: Sequence[int] | np.ndarray) -> str:
    return self._tok.decode([int(i) for i in ids], skip_special_tokens=True)

  def id_to_piece(self, i: int) -> str:
    return self._tok.id_to_token(int(i))


def read_chat_template(directory: str, settings: dict[str, Any]) -> str | None:
  """A model directory's chat template: chat_template.jinja (transformers 5 writes it
  there), else tokenizer_config.json's `chat_template` (a string, or named templates of
  which "default" is the one used)."""
  path = os.path.join(directory, "chat_template.jinja")
  if os.path.isfile(path):
    with open(path, encoding="utf-8") as f:
      return f.read()
  template = settings.get("chat_template")
  if isinstance(template, list):
    named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
    template = named.get("default")
  return template if isinstance(template, str) and template else None


def read_json(path: str) -> dict[str, Any]:
  """A JSON settings file of a model directory; {} when there is none."""
  if not os.path.isfile(path):
    return {}
  try:
    with open(path, encoding="utf-8-sig") as f:
      return json.load(f)
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise UserError(f"{path} is not valid JSON ({e})") from None


def sentencepiece_to_json(model: bytes) -> str:
  """An lmjax SentencePiece model (its bytes) as a `tokenizers` tokenizer.json that encodes
  and decodes exactly as SentencePiece does (unigram or BPE, byte fallback, identity
  normaliser).

  SentencePiece prefixes the text with one "▁", turns spaces into "▁" and splits
  before each "▁"; its user-defined symbols ([MASK], [CLS], [SEP]) are matched
  first, and "\n" is an ordinary piece with the best score.
  """
  import tokenizers
  from sentencepiece import sentencepiece_model_pb2
  from tokenizers import AddedToken, decoders, models, normalizers, pre_tokenizers, processors
  proto = sentencepiece_model_pb2.ModelProto()
  proto.ParseFromString(model)
  pieces = [(p.piece, p.score) for p in proto.pieces]
  unk = next(i for i, p in enumerate(proto.pieces) if p.type == p.UNKNOWN)
  if proto.trainer_spec.model_type == proto.trainer_spec.UNIGRAM:
    model = models.Unigram(pieces, unk_id=unk, byte_fallback=True)
  else:
    model = models.BPE({p: i for i, (p, _) in enumerate(pieces)}, _bpe_merges(pieces),
                       unk_token=pieces[unk][0], byte_fallback=True, fuse_unk=True)
  tok = tokenizers.Tokenizer(model)
  tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
  tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="never")
  tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(),
                                   decoders.Fuse(), decoders.Strip(" ", 1, 0)])
  control = [p.piece for p in proto.pieces if p.type == p.CONTROL]
  user = [p.piece for p in proto.pieces if p.type == p.USER_DEFINED and p.piece != "\n"]
  tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in control])
  tok.add_tokens([AddedToken(s, special=False, normalized=True) for s in user])
  bos = proto.trainer_spec.bos_id
  if bos >= 0:  # documents were pretrained as [bos] text: add_special_tokens adds it
    piece = proto.pieces[bos].piece
    tok.post_processor = processors.TemplateProcessing(
        single=f"{piece} $A", pair=f"{piece} $A $B", special_tokens=[(piece, bos)])
  return tok.to_str()


def _bpe_merges(pieces: list[tuple[str, float]]) -> list[tuple[str, str]]:
  """BPE merges in SentencePiece's order: a piece is made by the best-scored merge of two
  pieces whose concatenation it is."""
  rank = {p: i for i, (p, _) in enumerate(pieces)}
  merges = []
  for piece, _ in pieces:
    for cut in range(1, len(piece)):
      left, right = piece[:cut], piece[cut:]
      if left in rank and right in rank:
        merges.append((rank[piece], rank[left], rank[right], left, right))
  return [(left, right) for *_, left, right in sorted(merges)]
