import json
import os

import numpy as np
import pytest

from lmjax.data import BUNDLED_DIR, PackedDataset, Tokenizer, read_documents
from lmjax.data import corpus
from lmjax.data.tokenizer import train_tokenizer
from lmjax.data.tokenizer_io import install_tokenizer
from lmjax.errors import UserError

BUNDLED_TOKENIZER = os.path.join(BUNDLED_DIR, "tokenizer.model")


@pytest.fixture(scope="module")
def tokenizer():
  return Tokenizer(BUNDLED_TOKENIZER)


def test_bundled_tokenizer_special_tokens_and_round_trip(tokenizer):
  sp = tokenizer.special
  assert (sp.pad, sp.unk, sp.bos, sp.eos) == (0, 1, 2, 3)
  assert [tokenizer.id_to_piece(i) for i in (sp.mask, sp.cls, sp.sep)] == ["[MASK]", "[CLS]", "[SEP]"]
  text = "KING.\nWhat say'st thou,   fair one?\n\u00e9\u4f60"  # newlines, spaces, bytes
  assert tokenizer.decode(tokenizer.encode([text])[0]) == text


@pytest.mark.parametrize("model_type", ["unigram", "bpe"])
def test_train_tokenizer(tmp_path, model_type):
  lines = [line for doc in read_documents(os.path.join(BUNDLED_DIR, "valid.txt"))
           for line in doc.split("\n")]
  tok = train_tokenizer(lines, str(tmp_path / "t.model"), 400, model_type)
  assert tok.vocab_size == 400
  assert tok.special.mask == 4 and tok.special.sep == 6
  assert tok.decode(tok.encode(["To be, or not to be"])[0]) == "To be, or not to be"


def test_corrupt_or_missing_tokenizer_is_a_user_error(tmp_path):
  bad = tmp_path / "bad.model"
  bad.write_bytes(b"not a model")
  with pytest.raises(UserError, match="not a valid SentencePiece model"):
    Tokenizer(str(bad))
  with pytest.raises(UserError, match="not found"):
    Tokenizer(str(tmp_path / "missing.model"))


def test_workdir_keeps_its_tokenizer(tmp_path):
  tok = install_tokenizer(BUNDLED_TOKENIZER, str(tmp_path))
  assert tok.path == str(tmp_path / "tokenizer.model") and tok.sha256 == Tokenizer(BUNDLED_TOKENIZER).sha256
  other = train_tokenizer(["a b c d e f g"] * 50, str(tmp_path / "other.model"), 273)
  with pytest.raises(UserError, match="differs from the tokenizer"):
    install_tokenizer(other.path, str(tmp_path))


def test_txt_and_jsonl_documents(tmp_path):
  txt = tmp_path / "a.txt"
  txt.write_text("first line\nsecond line\n\n\nnext doc\n")
  assert list(read_documents(str(txt))) == ["first line\nsecond line", "next doc"]
  jsonl = tmp_path / "b.jsonl"
  jsonl.write_text(json.dumps({"text": "one"}) + "\n\n" + json.dumps({"text": "two"}) + "\n")
  assert list(read_documents(str(jsonl))) == ["one", "two"]
  jsonl.write_text('{"txt": 1}\n')
  with pytest.raises(UserError, match="'text' field"):
    list(read_documents(str(jsonl)))


def test_text_entries_are_prepared_once_into_the_cache_and_reused(tmp_path, tokenizer,
                                                                 monkeypatch):
  from lmjax.data import open_corpus
  from lmjax.data import prepare as prepare_lib
  path = tmp_path / "c.txt"
  path.write_text("To be, or not to be.\n\nThat is the question.\n")
  cache = str(tmp_path / "cache")
  source = open_corpus([str(path)], tokenizer, 2, 3, "clm", cache)
  tokens, starts = np.zeros(source.num_tokens, np.int32), np.zeros(source.num_tokens, bool)
  source.window(0, source.num_tokens, tokens, starts)
  second = int(np.flatnonzero(starts)[1])
  assert np.flatnonzero(starts).tolist() == [0, second]
  assert tokens[0] == 2 and tokens[second - 1] == 3 and tokens[-1] == 3
  monkeypatch.setattr(prepare_lib, "prepare", lambda *a, **k: pytest.fail("re-tokenized"))
  again = open_corpus([str(path)], tokenizer, 2, 3, "clm", cache)
  assert again.num_tokens == source.num_tokens
  path.write_text("Changed text.\n")  # new contents, new cache entry
  with pytest.raises(pytest.fail.Exception):
    open_corpus([str(path)], tokenizer, 2, 3, "clm", cache)


def _dataset(seed=0):
  tokens = np.arange(1000, dtype=np.int32) % 97 + 7
  starts = np.array([0, 5, 40, 41, 300, 777])
  return PackedDataset(corpus.TokenStream(tokens, starts), seq_len=16, seed=seed)


def test_batch_of_a_step_is_a_pure_function_of_seed_and_step():
  fresh, used = _dataset(), _dataset()
  for step in range(30):  # walk `used` through earlier steps and epochs
    used.batch(step, 8)
  for step in (0, 7, 29, 123):
    a, b = fresh.batch(step, 8), used.batch(step, 8)
    for key in a:
      np.testing.assert_array_equal(a[key], b[key])
  assert not np.array_equal(_dataset(seed=1).batch(0, 8)["tokens"], fresh.batch(0, 8)["tokens"])


def test_process_slices_make_up_the_global_batch():
  data = _dataset()
  whole = data.batch(5, 8)
  parts = [data.batch(5, 8, p, 4) for p in range(4)]
  for key in whole:
    np.testing.assert_array_equal(np.concatenate([p[key] for p in parts]), whole[key])


def test_each_epoch_visits_every_window_once():
  data = _dataset()
  n = data.num_windows
  ids = data.window_ids(0, 2 * n)
  assert sorted(ids[:n]) == list(range(n)) and sorted(ids[n:]) == list(range(n))
  assert not np.array_equal(ids[:n], ids[n:])


def test_packed_rows_segments_and_positions():
  data = _dataset()
  row = data.rows(np.array([2, -1]))  # window 2 covers stream offsets 32..47
  np.testing.assert_array_equal(row["tokens"][0], np.arange(32, 48) % 97 + 7)
  # docs start at 40 and 41 inside the window; the first doc began before it.
  np.testing.assert_array_equal(row["segment_ids"][0], [1] * 8 + [2] + [3] * 7)
  np.testing.assert_array_equal(row["positions"][0], list(range(8)) + [0] + list(range(7)))
  assert not row["segment_ids"][1].any() and not row["tokens"][1].any()  # padding row


def test_eval_batches_are_in_order_and_padded():
  data = _dataset()
  n = data.num_windows  # 62
  assert data.num_eval_batches(8) == 8
  last = data.eval_batch(7, 8)
  assert (last["segment_ids"][: n - 56] > 0).all() and not last["segment_ids"][n - 56:].any()
