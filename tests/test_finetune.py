"""Fine-tuning pieces: task encodings, pooling, batches, and training that learns."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lmjax import pretrained
from lmjax.data import genres
from lmjax.errors import UserError
from lmjax.data.examples import ExampleDataset
from lmjax.experiment import default_config, experiment_from_dict
from lmjax.run import train_and_evaluate
from tiny import finetune
from lmjax.model import SequenceClassifier, TransformerConfig


def test_genre_examples_hold_out_one_play_per_genre():
  train, held_out = genres.genre_examples("train"), genres.genre_examples("eval")
  assert sorted(set(l for _, l in train)) == sorted(set(l for _, l in held_out)) == [0, 1, 2]
  assert not {p for p, _ in train} & {p for p, _ in held_out}
  assert all(p.count("\n") == 11 for p, _ in held_out[:50])
  assert not any("PERSONS REPRESENTED" in p for p, _ in train)


def test_qa_encoding_marks_the_answer_tokens(tiny_runs):
  from lmjax.data import squad
  tok = pretrained.load(str(tiny_runs / "mlm_tiny")).tokenizer
  examples = [("Who doth call?", "Enter ROMEO and JULIET upon the stage.", "JULIET"),
              ("What?", "A horse! a horse! my kingdom for a horse!", "kingdom")]
  qa = [squad.QAExample(str(i), q, c, (a,), (c.index(a),)) for i, (q, c, a) in enumerate(examples)]
  enc = squad.make_windows(qa, tok, 32, 8, "encoder").arrays
  for i, (_, _, answer) in enumerate(examples):
    span = enc["tokens"][i, enc["starts"][i]:enc["ends"][i] + 1]
    assert tok.decode(span).strip() == answer
    assert enc["token_types"][i, enc["starts"][i]] == 1 and enc["token_types"][i, 1] == 0
  long = "word " * 40 + "end"
  windows = squad.make_windows(qa + [squad.QAExample("2", "q", long, ("end",), (200,))], tok,
                               32, 8, "encoder")
  assert windows.example.count(2) > 1  # a context past seq_len is cut into windows, not dropped
  last = len(windows.example) - 1
  assert tok.decode(windows.arrays["tokens"][last, windows.arrays["starts"][last]:
                                             windows.arrays["ends"][last] + 1]).strip() == "end"


def test_decoder_classifier_pools_the_last_real_token():
  cfg = TransformerConfig(vocab_size=50, max_len=16, d_model=16, num_layers=1, num_heads=2,
                          d_ff=32)
  model = SequenceClassifier(cfg, 3)
  tokens = jnp.array([[1, 5, 6, 7, 0, 0], [1, 5, 6, 7, 9, 9]])
  segments = jnp.array([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 0, 0]])
  params = model.init(jax.random.PRNGKey(0), tokens, segments)["params"]
  out = model.apply({"params": params}, tokens, segments)
  np.testing.assert_allclose(out[0], out[1], atol=1e-6)  # padding content is invisible
  cut = model.apply({"params": params}, tokens[:, :4], segments[:, :4])
  np.testing.assert_allclose(out, cut, atol=1e-5)


def test_task_batches_are_a_function_of_seed_and_step():
  data = ExampleDataset({"x": np.arange(10)}, seed=0)
  a = [data.batch(s, 4)["x"].tolist() for s in range(5)]
  assert a == [ExampleDataset({"x": np.arange(10)}, seed=0).batch(s, 4)["x"].tolist()
               for s in range(5)]
  assert sorted(a[0] + a[1] + a[2][:2]) == list(range(10))  # one epoch covers every example
  parts = [data.batch(3, 4, p, 2)["x"].tolist() for p in range(2)]
  assert parts[0] + parts[1] == a[3]  # process slices make up the global batch
  last = data.eval_batch(2, 4)
  assert last["x"].tolist()[:2] == [8, 9] and last["weights"].tolist() == [1, 1, 0, 0]


def test_qa_head_learns_a_toy_span_task(tiny_runs, tmp_path):
  """Question: a word; context: a line that contains it; answer: that word."""
  rng = np.random.default_rng(0)
  lines = [l for l in genres.genre_examples("train")[0][0].split("\n") if len(l.split()) > 4]
  rows = []
  for i in range(64):
    words = lines[i % len(lines)].split()
    w = words[rng.integers(len(words))]
    rows.append({"question": w, "context": " ".join(words), "answer": w})
  import json
  for name in ("train", "eval"):
    (tmp_path / f"{name}.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
  config = default_config("qa")
  config["task"].update(train_file=str(tmp_path / "train.jsonl"),
                        eval_file=str(tmp_path / "eval.jsonl"))
  config["data"]["seq_len"] = 48
  config["optimizer"].update(learning_rate=3e-3, warmup_steps=5)
  config["train"].update(steps=60, batch_size=16, eval_every=0, log_every=60, eval_batches=0)
  start = finetune({**config, "train": {**config["train"], "steps": 1}},
                   tiny_runs / "mlm_tiny", tmp_path / "first")
  result = finetune(config, tiny_runs / "mlm_tiny", tmp_path / "qa")
  assert result["loss"] < start["loss"] - 1.0, (start, result)
  assert result["accuracy"] > start["accuracy"]


def test_finetune_config_errors():
  with pytest.raises(UserError, match="unknown config key train.stepz"):
    experiment_from_dict({"train": {"stepz": 1}})
  with pytest.raises(UserError, match="train.init must be 'pretrained' or 'random'"):
    experiment_from_dict({"train": {"init": "zeros"}})
  with pytest.raises(UserError, match="objective.kind=qa fine-tunes a pretrained model: give "
                     "--init_from"):
    train_and_evaluate(experiment_from_dict(default_config("qa")), "/tmp/x")
