"""Token stores: every format, both engines, crashes, reruns, bad input, and training from one."""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from tiny import ROOT, tiny_config, tree_digest
from benchmarks.data_prep import SyntheticShard
from lmjax import train as train_lib
from lmjax.data import BUNDLED_DIR, PackedDataset, TokenSource, TokenStore, Tokenizer
from lmjax.data import read_documents
from lmjax.data.prepare import PrepareConfig, prepare
from lmjax.errors import UserError
from lmjax.experiment import experiment_from_dict

TOKENIZER = os.path.join(BUNDLED_DIR, "tokenizer.model")


@pytest.fixture(scope="module")
def tokenizer():
  return Tokenizer(TOKENIZER)


@pytest.fixture(scope="module")
def docs():
  return list(read_documents(os.path.join(BUNDLED_DIR, "valid.txt")))


def _jsonl(docs) -> bytes:
  return "".join(json.dumps({"id": i, "text": d}) + "\n" for i, d in enumerate(docs)).encode()


def _write_formats(folder, docs) -> dict[str, str]:
  """The same documents as txt, jsonl, jsonl.gz, jsonl.zst and parquet (several row groups)."""
  import pyarrow as pa
  import pyarrow.parquet as pq
  import zstandard
  folder.mkdir(exist_ok=True)
  paths = {k: str(folder / f"docs.{k}") for k in ("txt", "jsonl", "jsonl.gz", "jsonl.zst",
                                                  "parquet")}
  open(paths["txt"], "w").write("\n\n".join(docs) + "\n")
  open(paths["jsonl"], "wb").write(_jsonl(docs))
  open(paths["jsonl.gz"], "wb").write(gzip.compress(_jsonl(docs)))
  open(paths["jsonl.zst"], "wb").write(zstandard.ZstdCompressor().compress(_jsonl(docs)))
  pq.write_table(pa.table({"id": list(range(len(docs))), "text": docs}), paths["parquet"],
                 row_group_size=200)
  return paths


def _prepare(inputs, output, **kwargs):
  kwargs = {"begin": 2, "end": 3, "tokenizer": TOKENIZER, "workers": 1, **kwargs}
  return prepare(PrepareConfig(inputs=tuple(map(str, inputs)), output=str(output), **kwargs),
                 show_progress=False)


def _stream(path) -> tuple[np.ndarray, np.ndarray]:
  """(tokens, global document starts) of a whole store."""
  store = TokenStore.open(str(path))
  source = TokenSource(store.shards)
  tokens = np.zeros(source.num_tokens, np.int32)
  starts = np.zeros(source.num_tokens, bool)
  source.window(0, source.num_tokens, tokens, starts)
  return tokens, np.flatnonzero(starts)


def test_every_format_gives_the_tokenize_path_stream(tmp_path, tokenizer, docs):
  paths = _write_formats(tmp_path / "in", docs)
  # What tokenizing the documents in one piece gives: [bos] ids [eos] back to back.
  want = np.concatenate([[2, *ids, 3] for ids in tokenizer.encode(docs)])
  want_starts = np.cumsum([0] + [len(ids) + 2 for ids in tokenizer.encode(docs)])[:-1]
  for kind, path in paths.items():
    # 20 KB parts: the text formats are cut at document boundaries, parquet by row group.
    summary = _prepare([path], tmp_path / kind, split_mb=0.02, workers=2)
    compressed = kind in ("jsonl.gz", "jsonl.zst")  # a compressed stream is read whole
    assert summary.shards == 1 if compressed else summary.shards > 3, kind
    tokens, starts = _stream(tmp_path / kind)
    np.testing.assert_array_equal(tokens, want, err_msg=kind)
    np.testing.assert_array_equal(starts, want_starts, err_msg=kind)
    index = json.load(open(tmp_path / kind / "index.json"))
    assert index["num_docs"] == len(docs) and index["inputs"][0]["size"] == os.path.getsize(path)
    assert index["inputs"][0]["sha256"] == hashlib.sha256(open(path, "rb").read()).hexdigest()
    assert (index["tokenizer_sha256"], index["begin_id"], index["end_id"]) == (
        tokenizer.sha256, 2, 3)


def _shard_bytes(store) -> bytes:
  """The token and document-start files of a store, in name order."""
  folder = store / "shards"
  return b"".join((folder / n).read_bytes() for n in sorted(os.listdir(folder))
                  if n.endswith((".tokens", ".docs")))


def test_corpora_shaped_like_real_dumps(tmp_path, docs):
  """A byte-order mark, a dictionary-encoded parquet column and null texts read as the
  plain file does: the same token and document files, blanks and nulls counted."""
  import pyarrow as pa
  import pyarrow.parquet as pq
  import zstandard
  docs = docs[:40]
  plain = _write_formats(tmp_path / "plain", docs)
  bom = tmp_path / "bom"
  bom.mkdir()
  for kind, raw in (("txt", ("\n\n".join(docs) + "\n").encode()), ("jsonl", _jsonl(docs)),
                    ("jsonl.gz", gzip.compress(b"\xef\xbb\xbf" + _jsonl(docs))),
                    ("jsonl.zst", zstandard.ZstdCompressor().compress(b"\xef\xbb\xbf" +
                                                                       _jsonl(docs)))):
    (bom / f"docs.{kind}").write_bytes(raw if kind.endswith(("gz", "zst")) else
                                       b"\xef\xbb\xbf" + raw)
    assert list(read_documents(str(bom / f"docs.{kind}"))) == docs, kind
    _prepare([bom / f"docs.{kind}"], tmp_path / f"s-bom-{kind}")
    _prepare([plain[kind]], tmp_path / f"s-{kind}")
    assert _shard_bytes(tmp_path / f"s-bom-{kind}") == _shard_bytes(tmp_path / f"s-{kind}")

  table = pa.table({"text": pa.array(docs).dictionary_encode()})  # what categoricals write
  assert pa.types.is_dictionary(table.schema.field("text").type)
  pq.write_table(table, str(tmp_path / "dict.parquet"), row_group_size=200)
  _prepare([tmp_path / "dict.parquet"], tmp_path / "s-dict")
  _prepare([plain["parquet"]], tmp_path / "s-parquet")
  assert _shard_bytes(tmp_path / "s-dict") == _shard_bytes(tmp_path / "s-parquet")

  holes = [None if i % 7 == 3 else (" " if i % 11 == 5 else d) for i, d in enumerate(docs)]
  kept = [d for d in holes if d and d.strip()]
  pq.write_table(pa.table({"text": holes}), str(tmp_path / "holes.parquet"), row_group_size=8)
  (tmp_path / "holes.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in holes))
  (tmp_path / "kept.jsonl").write_bytes(_jsonl(kept))
  _prepare([tmp_path / "kept.jsonl"], tmp_path / "s-kept")
  for name in ("holes.parquet", "holes.jsonl"):
    summary = _prepare([tmp_path / name], tmp_path / f"s-{name}", split_mb=0.002)
    index = json.load(open(tmp_path / f"s-{name}" / "index.json"))
    assert summary.blank_docs == index["blank_docs"] == len(docs) - len(kept), name
    assert summary.num_docs == len(kept) and summary.shards > 1
    np.testing.assert_array_equal(_stream(tmp_path / f"s-{name}")[0],
                                  _stream(tmp_path / "s-kept")[0])
  proc = subprocess.run(_cli([tmp_path / "holes.jsonl"], tmp_path / "s-cli"), cwd=ROOT,
                        capture_output=True, text=True, timeout=120)
  assert f"{len(kept)} documents ({len(docs) - len(kept)} blank or null skipped)" in proc.stdout


def test_a_line_that_is_not_json_says_so(tmp_path):
  path = tmp_path / "broken.jsonl"
  path.write_text('{"text": "fine"}\n{"text": "a", "id": 2,}\n')
  with pytest.raises(UserError) as err:
    list(read_documents(str(path)))
  with pytest.raises(json.JSONDecodeError) as parser:  # its wording varies across Pythons
    json.loads('{"text": "a", "id": 2,}')
  assert str(err.value) == f"{path}:2: not valid JSON ({parser.value})"
  path.write_text('["text"]\n')
  with pytest.raises(UserError, match=":1: expected a JSON object with a 'text' field"):
    list(read_documents(str(path)))


def test_directories_and_globs_expand_in_sorted_order(tmp_path, docs):
  folder = tmp_path / "corpus" / "sub"
  folder.mkdir(parents=True)
  (folder / "b.jsonl").write_bytes(_jsonl(docs[:5]))
  (tmp_path / "corpus" / "a.jsonl").write_bytes(_jsonl(docs[5:9]))
  (tmp_path / "corpus" / "README.md").write_text("not a corpus")
  by_dir = _prepare([tmp_path / "corpus"], tmp_path / "s1")
  by_glob = _prepare([str(tmp_path / "corpus" / "**" / "*.jsonl")], tmp_path / "s2")
  assert by_dir.num_docs == by_glob.num_docs == 9
  inputs = [i["path"] for i in json.load(open(tmp_path / "s1" / "index.json"))["inputs"]]
  assert inputs == [str(tmp_path / "corpus" / "a.jsonl"), str(folder / "b.jsonl")]
  np.testing.assert_array_equal(_stream(tmp_path / "s1")[0], _stream(tmp_path / "s2")[0])


def test_ray_engine_writes_the_same_bytes_as_the_local_engine(tmp_path, docs):
  import ray  # in the test extras
  paths = _write_formats(tmp_path / "in", docs)
  inputs = [paths["txt"], paths["jsonl.gz"], paths["parquet"]]
  _prepare(inputs, tmp_path / "local", split_mb=0.05, workers=2)
  ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
  try:
    summary = _prepare(inputs, tmp_path / "ray", split_mb=0.05, workers=2, engine="ray")
  finally:
    ray.shutdown()
  assert summary.shards >= 6
  assert tree_digest(tmp_path / "ray") == tree_digest(tmp_path / "local")


def _big_corpus(folder) -> list[str]:
  """~7 MB of text in 3 files: slow enough to be killed part way."""
  text = open(os.path.join(BUNDLED_DIR, "train.txt")).read()
  folder.mkdir(exist_ok=True)
  for i in range(3):
    (folder / f"part{i}.txt").write_text(f"Copy {i}.\n\n" + text + text)
  return sorted(str(p) for p in folder.iterdir())


def _cli(inputs, output, *extra):
  return [sys.executable, "-m", "launch.prepare_data", *[f"--input={p}" for p in inputs],
          f"--tokenizer={TOKENIZER}", f"--output={output}", "--split_mb=0.25", *extra]


@pytest.fixture(scope="module")
def big_store(tmp_path_factory):
  """(the big corpus's files, its store prepared uninterrupted), once for both kills."""
  tmp = tmp_path_factory.mktemp("big")
  inputs = _big_corpus(tmp / "in")
  subprocess.run(_cli(inputs, tmp / "whole", "--workers=2"), cwd=ROOT, check=True,
                 capture_output=True, timeout=300)
  return inputs, tmp / "whole"


@pytest.mark.parametrize("records_before_kill", [2, 12])
def test_kill_9_then_rerun_gives_the_uninterrupted_store(tmp_path, big_store,
                                                          records_before_kill):
  inputs, whole = big_store
  out = tmp_path / "killed"
  proc = subprocess.Popen(_cli(inputs, out, "--workers=2"), cwd=ROOT,
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  deadline = time.monotonic() + 120
  while time.monotonic() < deadline and proc.poll() is None:
    shards = out / "shards"
    if shards.is_dir() and sum(n.endswith(".json") for n in os.listdir(shards)) >= records_before_kill:
      break
    time.sleep(0.005)
  proc.send_signal(signal.SIGKILL)
  proc.wait(timeout=30)
  assert not (out / "index.json").exists(), "killed too late: raise the corpus size"
  rerun = subprocess.run(_cli(inputs, out, "--workers=2"), cwd=ROOT, capture_output=True,
                         text=True, timeout=300)
  assert rerun.returncode == 0, rerun.stderr[-2000:]
  assert f"({records_before_kill}" in rerun.stdout or " reused)" in rerun.stdout
  reused = int(rerun.stdout.split(" reused)")[0].rsplit("(", 1)[1])
  assert reused >= records_before_kill
  assert tree_digest(out) == tree_digest(whole)


def test_rerun_keeps_complete_shards_redoes_damaged_ones_and_adds_new_inputs(tmp_path, docs):
  a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
  a.write_bytes(_jsonl(docs[:300]))
  b.write_bytes(_jsonl(docs[300:]))
  first = _prepare([a], tmp_path / "s", split_mb=0.02)
  assert first.reused == 0 and first.shards >= 3
  again = _prepare([a], tmp_path / "s", split_mb=0.02)
  assert again.reused == again.shards == first.shards
  shard = sorted((tmp_path / "s" / "shards").glob("*.tokens"))[0]
  damaged = bytearray(shard.read_bytes())
  damaged[10] ^= 0xFF
  shard.write_bytes(bytes(damaged))
  repaired = _prepare([a], tmp_path / "s", split_mb=0.02)
  assert repaired.reused == first.shards - 1
  grown = _prepare([a, b], tmp_path / "s", split_mb=0.02)
  assert grown.reused == first.shards and grown.shards > first.shards
  _prepare([a, b], tmp_path / "fresh", split_mb=0.02)
  assert tree_digest(tmp_path / "s") == tree_digest(tmp_path / "fresh")


def test_epoch_order_visits_every_window_once_whatever_the_process_count(tmp_path):
  data = PackedDataset(TokenSource([SyntheticShard(1000 * 16 + 5)]), seq_len=16, seed=3)
  n = data.num_windows
  assert n == 1000
  seen = data.window_ids(0, 2 * n)
  assert sorted(seen[:n]) == list(range(n)) and sorted(seen[n:]) == list(range(n))
  assert not np.array_equal(seen[:n], seen[n:]) and not np.array_equal(seen[:n], np.arange(n))
  for processes in (1, 2, 4, 8):
    rows = [data.batch(7, 64, p, processes)["tokens"] for p in range(processes)]
    np.testing.assert_array_equal(np.concatenate(rows), data.batch(7, 64)["tokens"])


def test_ten_billion_windows_cost_no_memory_per_window():
  data = PackedDataset(TokenSource([SyntheticShard(128 * 10**8)] * 100), seq_len=128, seed=0)
  assert data.num_windows == 10**10
  batch = data.batch(10**7, 32)
  starts = data.window_ids(10**7 * 32, 32) * 128
  np.testing.assert_array_equal(batch["tokens"][:, 0], starts % (128 * 10**8) % 50000)
  assert (batch["positions"][:, 1:] - batch["positions"][:, :-1] != 1).sum() >= 32


def test_training_from_a_store_equals_training_from_the_text_files(tmp_path):
  _prepare([os.path.join(BUNDLED_DIR, "train.txt")], tmp_path / "train_store", split_mb=0.1,
           workers=2)
  _prepare([os.path.join(BUNDLED_DIR, "valid.txt")], tmp_path / "eval_store")
  losses = []
  for name, files in (("text", None), ("store", (tmp_path / "train_store", tmp_path / "eval_store"))):
    extra = {} if files is None else {"data__train_files": (str(files[0]),),
                                      "data__eval_files": (str(files[1]),)}
    config = tiny_config("clm_tiny", tmp_path / name, train__steps=6, train__log_every=2,
                         train__eval_every=6, **extra)
    train_lib.train_and_evaluate(experiment_from_dict(config.to_dict()), str(tmp_path / name))
    losses.append([json.loads(line)["loss"] for line in open(tmp_path / name / "metrics.jsonl")])
  assert len(losses[0]) == 4 and losses[0] == losses[1]


# Two processes training from a store (each reading its rows of the shards, nothing
# tokenized again) live in tests/test_object_storage.py::
# test_two_processes_train_from_a_store_in_a_bucket_workdir, with the store in a bucket.


def _zstd(data: bytes) -> bytes:
  import zstandard
  return zstandard.ZstdCompressor(write_checksum=True).compress(data)


BAD_INPUTS = [  # (file name, its bytes from the documents, the message)
    ("c.jsonl.gz", lambda d: (lambda g: g[:-8] + bytes(4) + g[-4:])(gzip.compress(_jsonl(d))),
     "c.jsonl.gz: corrupt gzip stream"),
    ("t.jsonl.gz", lambda d: gzip.compress(_jsonl(d))[:-300], "t.jsonl.gz: corrupt gzip stream"),
    ("c.jsonl.zst", lambda d: _zstd(_jsonl(d))[:-4] + b"oops", "c.jsonl.zst: corrupt zstd stream"),
    ("t.jsonl.zst", lambda d: _zstd(_jsonl(d))[:-300], "t.jsonl.zst: corrupt zstd stream"),
    ("u.jsonl.gz", lambda d: gzip.compress(b'{"text": "ok"}\n{"text": "\xff"}\n'),
     "u.jsonl.gz:2: invalid UTF-8"),
    ("e.jsonl.zst", lambda d: _zstd(b"\n\n"),
     "e.jsonl.zst: no documents"),
    ("f.jsonl", lambda d: b'{"body": "x"}\n', "f.jsonl:1: expected a JSON object with a 'text'"),
    ("n.parquet", lambda d: b"PAR1 not really", "n.parquet: not a readable parquet file"),
]


@pytest.mark.parametrize("name,make,message", BAD_INPUTS, ids=[c[0] for c in BAD_INPUTS])
def test_bad_inputs_are_one_line_and_leave_no_store(tmp_path, docs, name, make, message):
  path = tmp_path / name
  path.write_bytes(make(docs))
  with pytest.raises(UserError) as err:
    _prepare([path], tmp_path / "store", workers=2)
  assert message in str(err.value) and "\n" not in str(err.value)
  assert not (tmp_path / "store" / "index.json").exists()
  shards = tmp_path / "store" / "shards"
  assert not shards.exists() or not [n for n in os.listdir(shards) if n.startswith(".")]


def test_parquet_without_the_text_column_and_globs_matching_nothing(tmp_path):
  import pyarrow as pa
  import pyarrow.parquet as pq
  pq.write_table(pa.table({"content": ["a", "b"]}), str(tmp_path / "p.parquet"))
  with pytest.raises(UserError, match=r"p.parquet: no column 'text' \(columns: content\)"):
    _prepare([tmp_path / "p.parquet"], tmp_path / "store")
  assert _prepare([tmp_path / "p.parquet"], tmp_path / "ok", text_field="content").num_docs == 2
  with pytest.raises(UserError, match="matches no files"):
    _prepare([str(tmp_path / "missing" / "*.parquet")], tmp_path / "store")


def test_cli_error_is_one_line_exit_2(tmp_path):
  (tmp_path / "bad.jsonl.gz").write_bytes(b"\x1f\x8b not gzip at all")
  proc = subprocess.run(_cli([tmp_path / "bad.jsonl.gz"], tmp_path / "store"), cwd=ROOT,
                        capture_output=True, text=True, timeout=120)
  assert proc.returncode == 2
  assert proc.stderr.strip().splitlines()[-1].startswith("error: ")
  assert "Traceback" not in proc.stderr and "bad.jsonl.gz" in proc.stderr


def test_runs_refuse_stores_of_another_tokenizer_or_delimiters_or_damaged(tmp_path):
  from lmjax.data.tokenizer import train_tokenizer
  other = train_tokenizer(["a b c d e f g"] * 50, str(tmp_path / "other.model"), 273)
  valid = os.path.join(BUNDLED_DIR, "valid.txt")
  _prepare([valid], tmp_path / "other_tok", tokenizer=other.path)
  _prepare([valid], tmp_path / "mlm", begin=5, end=6)
  _prepare([valid], tmp_path / "damaged")
  shard = sorted((tmp_path / "damaged" / "shards").glob("*.tokens"))[0]
  shard.write_bytes(shard.read_bytes()[:-2])
  cases = [("other_tok", "was prepared with another tokenizer"),
           ("mlm", "frames documents with ids 5/6, a clm run needs 2/3"),
           ("damaged", "bytes, the index says")]
  for store, message in cases:
    config = tiny_config("clm_tiny", tmp_path, train__steps=1,
                         data__train_files=(str(tmp_path / store),))
    with pytest.raises(UserError, match=message):
      train_lib.train_and_evaluate(experiment_from_dict(config.to_dict()), str(tmp_path / "run"))
    assert not (tmp_path / "run").exists()
