"""Tokenizers in and out of files: the one place that knows where a tokenizer lives.

`load_tokenizer` reads any source: an lmjax SentencePiece model file, a Hugging
Face tokenizer file or model directory, an lmjax run directory (its
`tokenizer.model`, or the Hugging Face tokenizer a fine-tuning run saved in
`tokenizer/`), each with the chat template beside it. `save_tokenizer` writes a
run's, `install_tokenizer` copies the pretraining tokenizer into a workdir once,
`export_tokenizer` writes the files `transformers` loads, and `serialized` /
`encoder` carry a tokenizer to worker processes as bytes.
"""

from __future__ import annotations

import json
import os
from typing import Any, Callable, Union

from lmjax import paths
from lmjax.data.hf_tokenizer import (FILES as HF_FILES, HFTokenizer, find_tokenizer_file,
                                     read_chat_template, read_json, sentencepiece_to_json)
from lmjax.data.tokenizer import Tokenizer
from lmjax.errors import UserError

AnyTokenizer = Union[Tokenizer, HFTokenizer]
SENTENCEPIECE_FILE = "tokenizer.model"  # lmjax's model, in a run or an export
HF_TOKENIZER_DIR = "tokenizer"  # a run's Hugging Face tokenizer (no config.json at its top)
CHAT_TEMPLATE = "chat_template.jinja"  # a chat run's template; transformers 5 writes one too
_HF_SIDE_FILES = ("tokenizer_config.json", "special_tokens_map.json", CHAT_TEMPLATE)


def load_tokenizer(source: str) -> AnyTokenizer:
  """The tokenizer at `source`: a SentencePiece model file, a Hugging Face tokenizer.json
  or vocab.txt, or a directory (an lmjax run, an lmjax export or a Hugging Face model),
  local or, for lmjax's own files, in a bucket. In a directory, a `chat_template.jinja`
  (or tokenizer_config.json's template) becomes the tokenizer's chat template."""
  if not paths.isdir(source):
    if os.path.basename(source) in HF_FILES:
      return HFTokenizer(os.path.dirname(source) or ".")
    return Tokenizer(source)  # one line if it is missing or not a SentencePiece model
  tokenizer = _directory_tokenizer(source)
  template = paths.join(source, CHAT_TEMPLATE)
  if paths.exists(template):  # a chat run's own, over the template of the model it started at
    tokenizer.chat_template = paths.read_bytes(template).decode("utf-8")
  elif tokenizer.chat_template is None and not paths.is_remote(source):
    settings = read_json(os.path.join(source, "tokenizer_config.json"))
    tokenizer.chat_template = read_chat_template(source, settings)  # an lmjax export's
  return tokenizer


def _directory_tokenizer(directory: str) -> AnyTokenizer:
  """lmjax's SentencePiece model where there is one (a run, an export), else a run's
  saved Hugging Face tokenizer, else the directory's own Hugging Face files."""
  model = paths.join(directory, SENTENCEPIECE_FILE)
  local = not paths.is_remote(directory)
  has_hf_files = local and find_tokenizer_file(directory) is not None
  if paths.isfile(model):
    try:
      return Tokenizer(model)
    except UserError:  # a model of its own (LLaMA's), without lmjax's special tokens
      if not has_hf_files:
        raise
  saved = paths.join(directory, HF_TOKENIZER_DIR)
  if local and os.path.isdir(saved) and find_tokenizer_file(saved) is not None:
    return HFTokenizer(saved)
  if has_hf_files:
    return HFTokenizer(directory)
  where = "" if local else " (Hugging Face tokenizers must be local)"
  raise UserError(f"{directory} holds no tokenizer: no {SENTENCEPIECE_FILE}, "
                  f"{HF_TOKENIZER_DIR}/, tokenizer.json or vocab.txt{where}")


def save_tokenizer(tokenizer: AnyTokenizer, workdir: str) -> None:
  """Writes a run's tokenizer beside its checkpoints: lmjax's SentencePiece model as
  tokenizer.model, a Hugging Face tokenizer's files (and its special ids) in tokenizer/;
  `load_tokenizer(workdir)` reads either back."""
  if isinstance(tokenizer, Tokenizer):
    paths.write_atomic(paths.join(workdir, SENTENCEPIECE_FILE), tokenizer.data)
    return
  origin, folder = os.path.dirname(tokenizer.path), paths.join(workdir, HF_TOKENIZER_DIR)
  paths.makedirs(folder)
  # generation_config.json: the model's eos ids and sampling defaults, which serving and
  # generation from the run keep (lmjax.inference.generation_config)
  for name in (os.path.basename(tokenizer.path), "tokenizer_config.json", CHAT_TEMPLATE,
               "generation_config.json"):
    if os.path.isfile(os.path.join(origin, name)):
      with open(os.path.join(origin, name), "rb") as f:
        paths.write_atomic(paths.join(folder, name), f.read())
  ids = {f"{k}_token_id": getattr(tokenizer.special, k) for k in ("bos", "eos", "pad")}
  paths.write_atomic(paths.join(folder, "config.json"), json.dumps(ids))


def install_tokenizer(source: str, workdir: str, write: bool = True) -> Tokenizer:
  """Copies the run's tokenizer into WORKDIR/tokenizer.model once and loads that copy.

  A workdir keeps the vocabulary it was trained with: a different `source`
  later is refused rather than silently decoding with the wrong pieces. With
  `write=False` only the checks run (the launcher validates everything before
  it writes anything).
  """
  dest = paths.join(workdir, SENTENCEPIECE_FILE)
  if not source and not paths.exists(dest):
    raise UserError("no tokenizer given: set --config.data.tokenizer=PATH")
  wanted = Tokenizer(source) if source else None
  if paths.exists(dest):
    installed = Tokenizer(dest)
    if wanted is not None and wanted.sha256 != installed.sha256:
      raise UserError(f"{source} differs from the tokenizer this workdir was trained with "
                      f"({dest}); use a new --workdir or the original tokenizer")
    return installed
  if not write:
    return wanted  # type: ignore[return-value]
  paths.makedirs(workdir)
  paths.write_atomic(dest, wanted.data)  # processes sharing a workdir write identical bytes
  return Tokenizer(dest)


def export_tokenizer(tokenizer: Any, directory: str) -> None:
  """The tokenizer beside exported weights (a local directory): a Hugging Face tokenizer's
  files as they are, or lmjax's SentencePiece model with a tokenizer.json and a
  tokenizer_config.json (special tokens, chat template) for transformers."""
  os.makedirs(directory, exist_ok=True)
  if isinstance(tokenizer, HFTokenizer):
    origin = os.path.dirname(tokenizer.path)
    for name in (*HF_FILES, *_HF_SIDE_FILES):
      if os.path.isfile(os.path.join(origin, name)):
        with open(os.path.join(origin, name), "rb") as f:
          paths.write_atomic(os.path.join(directory, name), f.read())
    settings = read_json(os.path.join(origin, "tokenizer_config.json"))
    if tokenizer.chat_template and tokenizer.chat_template != read_chat_template(origin, settings):
      # a chat run's own template (over its base model's): chat_template.jinja comes first
      # for transformers, as for `load_tokenizer`
      paths.write_atomic(os.path.join(directory, CHAT_TEMPLATE), tokenizer.chat_template)
    return
  if not isinstance(tokenizer, Tokenizer):  # weights without a tokenizer (benchmarks)
    return
  from lmjax.data.chat import DEFAULT_TEMPLATE
  paths.write_atomic(os.path.join(directory, SENTENCEPIECE_FILE), tokenizer.data)
  # For transformers: the same vocabulary as tokenizer.json (AutoTokenizer encodes and
  # decodes as SentencePiece does), its special tokens named so `generate` stops at this
  # vocabulary's own end of text.
  paths.write_atomic(os.path.join(directory, "tokenizer.json"),
                     sentencepiece_to_json(tokenizer.data))
  sp = tokenizer.special
  names = {f"{k}_token": tokenizer.id_to_piece(v) for k, v in (
      ("bos", sp.bos), ("eos", sp.eos), ("unk", sp.unk), ("pad", sp.pad), ("mask", sp.mask),
      ("cls", sp.cls), ("sep", sp.sep)) if v >= 0}
  # The chat template a chat run trained with, else lmjax's default: transformers'
  # apply_chat_template then renders and tokenizes conversations as lmjax does.
  template = tokenizer.chat_template or DEFAULT_TEMPLATE
  settings = {"tokenizer_class": "PreTrainedTokenizerFast", "add_bos_token": True,
              "add_eos_token": False, **names, "chat_template": template}
  paths.write_atomic(os.path.join(directory, "tokenizer_config.json"),
                     json.dumps(settings, indent=2))


def serialized(tokenizer: AnyTokenizer) -> tuple[str, bytes]:
  """(kind, bytes) from which `encoder` rebuilds `tokenizer` in another process."""
  if isinstance(tokenizer, Tokenizer):
    return "sentencepiece", tokenizer.data
  return "huggingface", tokenizer.serialized()


def encoder(kind: str, data: bytes, num_threads: int = 1
            ) -> Callable[[list[str]], list[list[int]]]:
  """texts -> ids without special tokens, from `serialized`'s output."""
  if kind == "sentencepiece":
    import sentencepiece as spm
    sp = spm.SentencePieceProcessor()
    sp.LoadFromSerializedProto(data)
    return lambda texts: sp.encode(texts, num_threads=num_threads)
  import tokenizers
  tok = tokenizers.Tokenizer.from_str(data.decode())
  tok.no_padding()
  tok.no_truncation()
  return lambda texts: [e.ids for e in tok.encode_batch(texts, add_special_tokens=False)]
