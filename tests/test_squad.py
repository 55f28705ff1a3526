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
  import os
  from tiny import ROOT
  raw = json.load(open(os.path.join(ROOT, "experiments", "data", "qa_eval.json")))
  qas = [qa for p in raw["data"][0]["paragraphs"] for qa in p["qas"]]
  shipped = squad.read_examples(os.path.join(ROOT, "experiments", "data", "qa_eval.json"))
  assert len(shipped) == len(qas) > 100  # indented JSON
  assert sum(e.impossible for e in shipped) == sum(qa["is_impossible"] for qa in qas) > 20
  (tmp_path / "hf.json").write_text(lines.read_text())  # datasets' to_json: lines, .json
  assert [e.id for e in squad.read_examples(str(tmp_path / "hf.json"))] == ["1", "2"]
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


def _long_example(answer_at: int = 300):
  import os
  from lmjax.data import BUNDLED_DIR
  with open(os.path.join(BUNDLED_DIR, "valid.txt")) as f:
    context = f.read()[:2000]
  start = context.index(" ", answer_at) + 1  # whole words: a span of tokens can hold them
  answer = " ".join(context[start:start + 40].split(" ")[:3])
  return QAExample("long", "Which words?", context, (answer,), (start,))


@pytest.mark.parametrize("kind", ["sentencepiece", "wordpiece"])
def test_windows_overlap_by_the_stride_and_point_at_the_answer(tmp_path, kind):
  from lmjax.data import BUNDLED_DIR, Tokenizer
  if kind == "sentencepiece":
    tok, family = Tokenizer(f"{BUNDLED_DIR}/tokenizer.model"), "decoder"
  else:
    from hf_models import _tokenizer
    from lmjax.data.hf_tokenizer import HFTokenizer
    _tokenizer("bert", str(tmp_path))
    tok, family = HFTokenizer(str(tmp_path)), "encoder"
  ex, none = _long_example(), QAExample("none", "Who?", "A short context.", (), ())
  w = squad.make_windows([ex, none], tok, 64, 16, family)
  rows = [r for r, i in enumerate(w.example) if i == 0]
  assert len(rows) > 3 and w.example[-1] == 1
  for a, b in zip(rows, rows[1:]):  # consecutive windows share doc_stride context tokens
    ctx_a = [o for o in w.offsets[a] if o is not None]
    ctx_b = [o for o in w.offsets[b] if o is not None]
    assert ctx_a[-16:] == ctx_b[:16]
  hits = [r for r in rows if w.arrays["starts"][r] > 0]
  assert hits and all(w.arrays["starts"][r] == w.arrays["ends"][r] == 0
                      for r in rows if r not in hits)
  for r in hits:
    s, e = w.arrays["starts"][r], w.arrays["ends"][r]
    got = ex.context[w.offsets[r][s][0]:w.offsets[r][e][1]]
    assert squad.normalize_answer(got) == squad.normalize_answer(ex.answers[0])
  assert w.arrays["starts"][-1] == 0  # an unanswerable question points at the null position
  with pytest.raises(UserError, match="question long: .* not more than objective.doc_stride=16"):
    squad.make_windows([QAExample("long", "Why? " * 60, "x", (), ())], tok, 64, 16, family)


def test_best_answers_search_spans_over_windows_by_the_run_qa_rules():
  import numpy as np
  from lmjax.data import BUNDLED_DIR, Tokenizer
  tok = Tokenizer(f"{BUNDLED_DIR}/tokenizer.model")
  ex = _long_example()
  w = squad.make_windows([ex], tok, 64, 16, "decoder")
  r = next(r for r in range(len(w.example)) if w.arrays["starts"][r] > 0)
  s_at, e_at = int(w.arrays["starts"][r]), int(w.arrays["ends"][r])
  start, end = np.zeros((len(w.example), 64)), np.zeros((len(w.example), 64))
  start[r, s_at], end[r, e_at] = 5.0, 5.0
  end[r, s_at - 1] = 9.0  # a better end before the start: never taken
  preds, odds, nbest = squad.best_answers(w, start, end, [ex])
  assert squad.exact(preds["long"], ex.answers[0]) and nbest["long"][0]["score"] == 10.0
  assert odds["long"] == pytest.approx(0.0 - 10.0)  # null (0 + 0) minus the best span
  capped, _, _ = squad.best_answers(w, start, end, [ex], max_answer_tokens=e_at - s_at)
  assert capped["long"] != preds["long"]  # the answer is one token too long now
  start[:, 0] = end[:, 0] = 6.0  # the null answer scores 12 in every window
  v2, odds, _ = squad.best_answers(w, start, end, [ex], null_threshold=0.0)
  assert v2["long"] == "" and odds["long"] == pytest.approx(2.0)
  assert squad.best_answers(w, start, end, [ex], null_threshold=3.0)[0]["long"] == preds["long"]


def test_qa_fine_tuning_reports_squad_measures_and_writes_predictions(tiny_runs, tmp_path):
  """SQuAD 2.0 JSON with contexts longer than seq_len and unanswerable questions, through
  launch.finetune's loop: results.json holds EM/F1 and the split, predictions.json the
  answers in the official scripts' format."""
  from lmjax.data import BUNDLED_DIR
  from lmjax.experiment import default_config
  from tiny import finetune
  with open(f"{BUNDLED_DIR}/valid.txt") as f:
    lines = [l.strip() for l in f if len(l.split()) > 5][:120]
  paragraphs = []
  for i in range(0, 96, 6):
    context = " ".join(lines[i:i + 6])
    word = context.split()[(i * 7) % 30]
    qa = {"id": f"q{i}", "question": f"Where is {word}?", "is_impossible": i % 4 == 0,
          "answers": [] if i % 4 == 0 else [{"text": word, "answer_start": context.index(word)}]}
    paragraphs.append({"context": context, "qas": [qa]})
  path = tmp_path / "squad.json"
  path.write_text(json.dumps({"version": "v2.0", "data": [{"title": "t",
                                                          "paragraphs": paragraphs}]}))
  config = default_config("qa")
  config["task"].update(train_file=str(path), eval_file=str(path))
  config["objective"]["doc_stride"] = 16
  config["data"]["seq_len"] = 48
  config["train"].update(steps=3, batch_size=8, eval_every=0, log_every=3, eval_batches=0)
  result = finetune(config, tiny_runs / "mlm_tiny", tmp_path / "run")
  assert result["examples"] == 16 and result["windows"] > 16  # contexts past seq_len
  assert {"exact", "f1", "HasAns_exact", "HasAns_f1", "NoAns_exact", "best_f1",
          "best_f1_thresh"} <= set(result)
  assert 0 <= result["exact"] <= result["f1"] <= 100 and result["NoAns_total"] == 8
  predictions = json.loads((tmp_path / "run" / "predictions.json").read_text())
  assert set(predictions) == {f"q{i}" for i in range(0, 96, 6)}
  examples = squad.read_examples(str(path))
  # predictions.json alone gives results.json's numbers (at the default null threshold)
  assert result["exact"] == pytest.approx(squad.evaluate(examples, predictions)["exact"])
  assert result["f1"] == pytest.approx(squad.evaluate(examples, predictions)["f1"])


def _qa_subset(tmp_path, split, n):
  import os
  from tiny import ROOT
  data = json.load(open(os.path.join(ROOT, "experiments", "data", f"qa_{split}.json")))
  data["data"][0]["paragraphs"] = data["data"][0]["paragraphs"][:n]
  path = tmp_path / f"qa_{split}.json"
  path.write_text(json.dumps(data))
  return str(path)


def _qa_command(tiny_runs, tmp_path, workdir, *args):
  import sys
  return [sys.executable, "-m", "launch.finetune", "--config=experiments/qa_tiny.py",
          f"--init_from={tiny_runs / 'mlm_tiny'}", f"--workdir={workdir}",
          f"--config.task.train_file={_qa_subset(tmp_path, 'train', 40)}",
          f"--config.task.eval_file={_qa_subset(tmp_path, 'eval', 12)}",
          "--config.train.batch_size=8", "--config.train.log_every=1",
          "--config.train.eval_every=0", "--config.optimizer.warmup_steps=1", *args]


def test_qa_on_eight_devices_equals_one_and_kill_9_resumes_exactly(tiny_runs, tmp_path):
  """One uninterrupted one-device run, in process (launch.finetune's experiment, the
  command's flags): the reference for the 8-device run and for the killed and rerun one,
  both through launch.finetune."""
  import subprocess

  from experiments import qa_tiny
  from tiny import kill_once
  from tiny import ROOT, assert_same_checkpoint, finetune
  run = lambda workdir, *args: subprocess.run(
      _qa_command(tiny_runs, tmp_path, workdir, *args), cwd=ROOT, capture_output=True,
      text=True, timeout=600)
  config = qa_tiny.get_config().to_dict()
  config["task"].update(train_file=_qa_subset(tmp_path, "train", 40),
                        eval_file=_qa_subset(tmp_path, "eval", 12))
  config["train"].update(batch_size=8, log_every=1, eval_every=0, steps=6, checkpoint_every=2)
  config["optimizer"]["warmup_steps"] = 1
  a = finetune(config, tiny_runs / "mlm_tiny", tmp_path / "straight")
  steps = ["--config.train.steps=6", "--config.train.checkpoint_every=2"]
  eight = run(tmp_path / "eight", "--cpu_devices=8", "--config.mesh.data=2",
              "--config.mesh.fsdp=4", *steps)
  assert eight.returncode == 0, eight.stderr[-2000:]
  b = json.loads((tmp_path / "eight" / "results.json").read_text())
  for key in ("loss", "exact", "f1"):
    assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-4), key

  killed = tmp_path / "killed"  # once: killed twice and more, tests/test_kill.py
  kill_once(subprocess.Popen(_qa_command(tiny_runs, tmp_path, killed, *steps), cwd=ROOT,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                             start_new_session=True), killed / "metrics.jsonl")
  assert run(killed, *steps).returncode == 0
  assert_same_checkpoint(tmp_path / "straight", killed, 6)
  assert (killed / "predictions.json").read_text() == \
      (tmp_path / "straight" / "predictions.json").read_text()


@pytest.mark.parametrize("init", ["bert", "clm_tiny"])  # a Hugging Face BERT; a decoder run
def test_qa_starts_from_a_hugging_face_bert_and_from_a_decoder(tiny_runs, tmp_path, init):
  from lmjax.finetune import default_finetune_config  # lmjax 0.1's schema still reads
  from tiny import finetune
  config = default_finetune_config()
  config["task"].update(kind="qa", train_file=_qa_subset(tmp_path, "train", 24),
                        eval_file=_qa_subset(tmp_path, "eval", 8), seq_len=64, doc_stride=16,
                        dropout_rate=0.0)
  config["train"].update(steps=2, batch_size=8, eval_every=0, log_every=2)
  result = finetune(config, tiny_runs / init, tmp_path / "run")
  assert result["examples"] == 8 and result["windows"] > 8
  assert {"exact", "f1", "HasAns_f1", "NoAns_exact", "best_exact_thresh"} <= set(result)
  assert len(json.loads((tmp_path / "run" / "predictions.json").read_text())) == 8
