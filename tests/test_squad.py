"""SQuAD measures by the official scripts' rules, on hand-worked cases, and the readers."""

import json

import pytest

from lmjax.data import squad
from lmjax.data.squad import QAExample
from lmjax.errors import UserError


def test_normalisation_and_token_f1_by_hand():
  assert squad.normalize_answer("The  Quick, brown fox!") == "quick brown fox"
  assert squad.normalize_answer("An apple a day") == "apple day"
  assert squad.normalize_answer("Theatre") == "theatre"  # articles only as words
  # pred [cat, sat], gold [cat, sat, down]: precision 1, recall 2/3 -> F1 0.8
  assert squad.f1("the cat sat", "a cat sat down") == pytest.approx(0.8)
  assert squad.f1("cat cat", "cat") == pytest.approx(2 * 0.5 * 1 / 1.5)  # counts clip
  assert squad.f1("", "") == 1.0 and squad.f1("x", "") == 0.0 and squad.f1("", "x") == 0.0
  assert squad.exact("The Eiffel Tower.", "eiffel tower") == 1


def test_several_gold_answers_take_the_best_and_no_answer_is_the_empty_string():
  ex = QAExample("q", "?", "ctx", ("Denver Broncos", "the Broncos"), (0, 0))
  assert squad.scores(ex, "Broncos") == (1, 1.0)  # "the Broncos" normalises to "broncos"
  assert squad.scores(ex, "Denver") == (0, pytest.approx(2 / 3))  # p 1, r 1/2
  none = QAExample("n", "?", "ctx", (), ())
  assert squad.scores(none, "") == (1, 1.0) and squad.scores(none, "Denver") == (0, 0.0)


def test_v2_split_and_best_threshold_by_hand():
  examples = [QAExample("a", "?", "c", ("red fox",), (0,)),
              QAExample("b", "?", "c", ("blue",), (0,)),
              QAExample("c", "?", "c", (), ())]
  preds = {"a": "red fox", "b": "green", "c": "fox"}
  out = squad.evaluate(examples, preds)
  # exact: a 1, b 0, c 0 -> 33.3; HasAns 50, NoAns 0
  assert out["exact"] == pytest.approx(100 / 3) and out["HasAns_exact"] == 50.0
  assert out["NoAns_exact"] == 0.0 and out["total"] == 3 and out["NoAns_total"] == 1
  probs = {"a": 0.1, "b": 0.6, "c": 0.9}
  # threshold 0.5: b and c answer "no answer": a 1, b 0, c 1 -> 66.7
  assert squad.evaluate(examples, preds, probs, 0.5)["exact"] == pytest.approx(200 / 3)
  # best threshold: start at 1 (c right by abstaining); past a (+1) -> 2 at 0.1; past b (+0);
  # past c (-1, it answers "fox") -> best 2/3 at 0.1
  best = squad.evaluate(examples, preds, probs)
  assert best["best_exact"] == pytest.approx(200 / 3) and best["best_exact_thresh"] == 0.1
  with pytest.raises(UserError, match="no prediction for 1 questions, e.g. c"):
    squad.evaluate(examples, {"a": "", "b": ""})


def _squad_file(tmp_path, qas, context="The quick brown fox jumps."):
  path = tmp_path / "dev.json"
  path.write_text(json.dumps({"version": "v2.0", "data": [
      {"title": "t", "paragraphs": [{"context": context, "qas": qas}]}]}))
  return str(path)


def test_readers_take_squad_json_and_hugging_face_lines(tmp_path):
  path = _squad_file(tmp_path, [
      {"id": "1", "question": "What jumps?", "is_impossible": False,
       "answers": [{"text": "brown fox", "answer_start": 10},
                   {"text": "fox", "answer_start": 16}]},
      {"id": "2", "question": "Who sleeps?", "is_impossible": True, "answers": [],
       "plausible_answers": [{"text": "fox", "answer_start": 16}]}])
  a, b = squad.read_examples(path)
  assert a.answers == ("brown fox", "fox") and a.starts == (10, 16) and b.impossible
  lines = tmp_path / "dev.jsonl"
  lines.write_text("".join(json.dumps(r) + "\n" for r in [
      {"id": "1", "context": "The quick brown fox jumps.", "question": "What jumps?",
       "answers": {"text": ["brown fox"], "answer_start": [10]}},
      {"id": "2", "context": "x y", "question": "Who?", "answers": {"text": [],
                                                                   "answer_start": []}}]))
  c, d = squad.read_examples(str(lines))
  assert c.answers == ("brown fox",) and d.impossible
  squad.write_predictions(str(tmp_path / "predictions.json"), {"1": "brown fox", "2": ""})
  assert json.loads((tmp_path / "predictions.json").read_text()) == {"1": "brown fox", "2": ""}


@pytest.mark.parametrize("qa,context,message", [
    ({"id": "1", "question": "Q?", "answers": []}, "Some text.",
     "no answers and no is_impossible"),
    ({"id": "1", "question": "Q?", "answers": [{"text": "fox", "answer_start": 3}]},
     "The quick brown fox.", "answer_start 3 does not point at 'fox' (it is at 16)"),
    ({"id": "1", "question": "Q?", "is_impossible": True, "answers": []}, "  ", "empty context"),
])
def test_bad_squad_input_is_one_line(tmp_path, qa, context, message):
  with pytest.raises(UserError) as err:
    squad.read_examples(_squad_file(tmp_path, [qa], context))
  assert message in str(err.value) and "question 1" in str(err.value)
  assert "\n" not in str(err.value)
