"""lmjax.data.tokenizer_io: one `load_tokenizer` for every place a tokenizer lives (a
SentencePiece file, a Hugging Face file or directory, a run, an export), and what writes
them (save_tokenizer, install_tokenizer, export_tokenizer, serialized)."""

import os
import shutil

import pytest

from hf_models import CHATML, make_chat_tokenizer
from lmjax.data import BUNDLED_DIR, Tokenizer, load_tokenizer
from lmjax.data.hf_tokenizer import HFTokenizer
from lmjax.data.tokenizer_io import (encoder, export_tokenizer, install_tokenizer,
                                     save_tokenizer, serialized)
from lmjax.errors import UserError

SENTENCEPIECE = os.path.join(BUNDLED_DIR, "tokenizer.model")
TEMPLATE = "{% for m in messages %}{{ m['content'] }}{% endfor %}"


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
  return make_chat_tokenizer(str(tmp_path_factory.mktemp("hf") / "chatml"))


def test_files_and_hugging_face_directories(hf_dir, tmp_path):
  sp = load_tokenizer(SENTENCEPIECE)
  assert isinstance(sp, Tokenizer) and sp.chat_template is None
  for source in (hf_dir, os.path.join(hf_dir, "tokenizer.json")):
    hf = load_tokenizer(source)
    assert isinstance(hf, HFTokenizer) and hf.chat_template == CHATML
  with pytest.raises(UserError, match="tokenizer file not found"):
    load_tokenizer(str(tmp_path / "missing.model"))
  with pytest.raises(UserError, match="holds no tokenizer"):
    load_tokenizer(str(tmp_path))


def test_a_run_directory_with_its_chat_template(tmp_path):
  run = str(tmp_path / "run")
  installed = install_tokenizer(SENTENCEPIECE, run)
  assert installed.path == os.path.join(run, "tokenizer.model")
  assert load_tokenizer(run).chat_template is None
  (tmp_path / "run" / "chat_template.jinja").write_text(TEMPLATE)
  tok = load_tokenizer(run)
  assert isinstance(tok, Tokenizer) and tok.sha256 == installed.sha256
  assert tok.chat_template == TEMPLATE


def test_a_run_keeps_a_hugging_face_tokenizer_and_its_chat_template(hf_dir, tmp_path):
  """A fine-tuning run from a Hugging Face model saves its tokenizer in tokenizer/; the run's
  own chat template (a chat task's) wins over the model's."""
  source = load_tokenizer(hf_dir)
  run = tmp_path / "run"
  run.mkdir()
  save_tokenizer(source, str(run))
  back = load_tokenizer(str(run))
  assert isinstance(back, HFTokenizer) and back.sha256 == source.sha256
  assert back.special == source.special and back.chat_template == CHATML
  assert back.encode(["<|im_start|>user hi"]) == source.encode(["<|im_start|>user hi"])
  (run / "chat_template.jinja").write_text(TEMPLATE)
  chat = load_tokenizer(str(run))
  assert chat.chat_template == TEMPLATE
  export_tokenizer(chat, str(tmp_path / "export"))  # exported with the run's template
  exported = load_tokenizer(str(tmp_path / "export"))
  assert exported.sha256 == source.sha256 and exported.chat_template == TEMPLATE


def test_an_export_reads_back_with_its_chat_template(tmp_path):
  tok = Tokenizer(SENTENCEPIECE)
  tok.chat_template = TEMPLATE
  export_tokenizer(tok, str(tmp_path))
  assert {"tokenizer.model", "tokenizer.json", "tokenizer_config.json"} <= set(os.listdir(tmp_path))
  back = load_tokenizer(str(tmp_path))
  assert isinstance(back, Tokenizer) and back.sha256 == tok.sha256
  assert back.chat_template == TEMPLATE
  import tokenizers  # the tokenizer.json export encodes as SentencePiece does
  exported = tokenizers.Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
  text = "ROMEO.\nBut soft, what light"
  assert exported.encode(text, add_special_tokens=False).ids == tok.encode([text])[0]


def test_a_foreign_sentencepiece_model_falls_back_to_the_hugging_face_files(hf_dir, tmp_path):
  """LLaMA's directories hold a tokenizer.model without lmjax's special tokens beside
  their tokenizer.json: the latter is read."""
  llama = tmp_path / "llama"
  shutil.copytree(hf_dir, llama)
  (llama / "tokenizer.model").write_bytes(b"a SentencePiece model lmjax cannot use")
  assert isinstance(load_tokenizer(str(llama)), HFTokenizer)
  os.remove(llama / "tokenizer.json")
  with pytest.raises(UserError, match="not a valid SentencePiece model"):
    load_tokenizer(str(llama))


def test_serialized_tokenizers_encode_alike_in_workers(hf_dir):
  texts = ["To be, or not to be", "<|im_start|>user\nhi<|im_end|>"]
  for tok in (Tokenizer(SENTENCEPIECE), load_tokenizer(hf_dir)):
    assert encoder(*serialized(tok))(texts) == tok.encode(texts)
