"""One JSON-lines rule for every reader: UTF-8, a leading byte-order mark dropped, each
failure one line naming path:line."""

import gzip
import json

import pytest

from lmjax.data import chat, squad
from lmjax.data import examples
from lmjax.data.jsonl import BOM, read_json_lines
from lmjax.data.readers import read_documents
from lmjax.errors import UserError


def _write(path, records, bom=True):
  data = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode()
  path.write_bytes((BOM if bom else b"") + data)
  return str(path)


CONVERSATION = {"messages": [{"role": "user", "content": "Hi"},
                             {"role": "assistant", "content": "Hello"}]}
PAIR = {"prompt": "Say hi", "chosen": "Hi", "rejected": "Go away"}
QA = {"id": "q1", "question": "Who?", "context": "Romeo speaks.",
      "answers": {"text": ["Romeo"], "answer_start": [0]}}


def test_every_reader_accepts_a_file_that_starts_with_a_bom(tmp_path):
  got = chat.read_conversations(_write(tmp_path / "chat.jsonl", [CONVERSATION, CONVERSATION]))
  assert [c.messages[0]["content"] for c in got] == ["Hi", "Hi"]
  assert got[1].where.endswith("chat.jsonl:2")
  pairs = chat.read_preferences(_write(tmp_path / "dpo.jsonl", [PAIR]))
  assert pairs[0].prompt == "Say hi"
  labelled = examples.read_labelled(_write(tmp_path / "task.jsonl",
                                        [{"text": "a", "label": "pos"}]), ["neg", "pos"])
  assert labelled == [("a", None, 1)]
  assert [e.id for e in squad.read_examples(_write(tmp_path / "qa.jsonl", [QA, QA]))] == ["q1"] * 2
  whole = {"version": "v2.0", "data": [{"paragraphs": [{"context": "Romeo speaks.", "qas": [
      {"id": "s1", "question": "Who?", "answers": [{"text": "Romeo", "answer_start": 0}]}]}]}]}
  (tmp_path / "squad.json").write_bytes(BOM + json.dumps(whole).encode())
  assert [e.id for e in squad.read_examples(str(tmp_path / "squad.json"))] == ["s1"]
  docs = _write(tmp_path / "docs.jsonl", [{"text": "one"}, {"text": "two"}])
  assert list(read_documents(docs)) == ["one", "two"]
  (tmp_path / "docs.jsonl.gz").write_bytes(gzip.compress((tmp_path / "docs.jsonl").read_bytes()))
  assert list(read_documents(str(tmp_path / "docs.jsonl.gz"))) == ["one", "two"]


@pytest.mark.parametrize("data,says", [
    (b'{"a": 1}\n\n{"a": 2,}\n', "x.jsonl:3: not valid JSON"),
    (b'{"a": 1}\n{"a": "\xff"}\n', "x.jsonl:2: invalid UTF-8"),
    (b'[1, 2]\n', "x.jsonl:1: expected a JSON object"),
    (b'{"a": 1}\n' + BOM + b'{"a": 2}\n', "x.jsonl:2: not valid JSON"),  # only a leading BOM
    (b"", "task file is empty"),
])
def test_a_bad_line_is_one_error_naming_its_line(tmp_path, data, says):
  (tmp_path / "x.jsonl").write_bytes(data)
  with pytest.raises(UserError, match=says):
    list(read_json_lines(str(tmp_path / "x.jsonl")))


def test_missing_files_and_directories_are_one_line(tmp_path):
  with pytest.raises(UserError, match="chat file not found"):
    list(read_json_lines(str(tmp_path / "nope.jsonl"), "chat"))
  with pytest.raises(UserError, match="is a directory"):
    list(read_json_lines(str(tmp_path)))
  with pytest.raises(UserError, match="task file not found"):
    examples.read_labelled(str(tmp_path / "nope.jsonl"), ["a"])


def test_line_separators_inside_strings_do_not_split_records(tmp_path):
  """U+2028 and U+2029 are legal unescaped in JSON strings (ensure_ascii=False writes
  them raw): a record holding one is still one line."""
  qa = dict(QA, context="Romeo speaks.\u2028Juliet listens.\u2029")
  path = _write(tmp_path / "qa.jsonl", [qa, QA], bom=False)
  assert [e.context for e in squad.read_examples(path)] == [qa["context"], QA["context"]]
  conv = {"messages": [{"role": "user", "content": "a\u2028b"},
                       {"role": "assistant", "content": "c"}]}
  got = chat.read_conversations(_write(tmp_path / "chat.jsonl", [conv]))
  assert got[0].messages[0]["content"] == "a\u2028b"


def test_task_records_name_their_line_and_missing_fields(tmp_path):
  path = _write(tmp_path / "t.jsonl", [{"text": "a", "label": 0}, {"text": "b"}])
  with pytest.raises(UserError, match="t.jsonl:2: expected a JSON object with text, label"):
    examples.read_labelled(path, ["x"])
