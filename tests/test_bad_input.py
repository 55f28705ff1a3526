"""A table of bad inputs: each is a UserError with an actionable message (launchers turn it
into one `error:` line and exit status 2, see test_launch.py), and the workdir's checkpoint
files stay byte-for-byte unchanged."""

import os
import shutil

import jax
import pytest

from lmjax import train as train_lib
from lmjax.data import BUNDLED_DIR
from lmjax.errors import UserError
from lmjax.experiment import default_config, experiment_from_dict
from tiny import tiny_config, tree_digest

CONFIG_CASES = [
    ({"bogus": {}}, "unknown config section(s) bogus"),
    ({"optimizer": {"lrr": 1}}, "unknown config key optimizer.lrr"),
    ({"model": {"d_model": "big"}}, "model.d_model must be of type int"),
    ({"model": {"d_model": 1.5}}, "model.d_model must be of type int"),
    ({"train": {"async_checkpoints": "yes"}}, "train.async_checkpoints must be of type bool"),
    ({"data": {"train_files": "a.txt"}}, "data.train_files must be of type tuple"),
    ({"model": {"family": "seq2seq"}}, "model.family must be 'decoder' or 'encoder'"),
    ({"model": {"num_heads": 3}}, "not divisible by model.num_heads=3"),
    ({"model": {"num_kv_heads": 3}}, "must be a multiple of model.num_kv_heads=3"),
    ({"model": {"attention_impl": "flash"}}, "model.attention_impl must be one of"),
    ({"model": {"remat_policy": "most"}}, "model.remat_policy must be one of"),
    ({"model": {"parametrization": "ntk"}}, "model.parametrization must be 'sp' or 'mup'"),
    ({"model": {"parametrization": "mup", "mup_base_d_model": 96}},
     "model.d_model=256 is not a multiple of model.mup_base_d_model=96"),
    ({"model": {"dtype": "float8"}}, "model.dtype must be auto, float32, bfloat16, float16, bfloat16_matmuls"),
    ({"optimizer": {"schedule": "step"}}, "optimizer.schedule must be cosine, linear, constant or wsd"),
    ({"objective": {"kind": "span"}}, "objective.kind must be one of clm, mlm,"),
    ({"objective": {"kind": "mlm", "mask_rate": 1.5}}, "0 < mask_rate < 1"),
    ({"objective": {"mask_rate": 0.3}}, "objective.mask_rate is not an option of "
     "objective.kind=clm (its options: fused_head, kind, label_smoothing, z_loss)"),
    ({"objective": {"kind": "dpo", "beta": 0.0}}, "objective.beta must be positive"),
    ({"data": {"bad_utf8": "ignore"}}, "data.bad_utf8 must be 'fail' or 'skip'"),
    ({"mesh": {"rules": (("batch", "model"),)}}, "unknown mesh axis 'model'"),
]


@pytest.mark.parametrize("change,message", CONFIG_CASES)
def test_bad_config(change, message):
  config = default_config()
  for section, values in change.items():
    config.setdefault(section, {}).update(values)
  with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)")):
    experiment_from_dict(config)


def _write(path, data: bytes):
  path.write_bytes(data)
  return str(path)


def _mkdir(path):
  path.mkdir(exist_ok=True)
  (path / "notes.md").write_text("not a corpus")
  return str(path)


def _run_cases(tmp):
  """(override builder, expected message): each gets the tmp dir, returns config overrides."""
  other_tok = str(tmp / "other.model")
  return [
      (lambda: {"data__train_files": (str(tmp / "missing.txt"),)}, "train file not found"),
      (lambda: {"data__train_files": (_write(tmp / "empty.txt", b""),)}, "train file is empty"),
      (lambda: {"data__eval_files": (_write(tmp / "x.csv", b"a,b\n"),)}, "must end in one of .txt, .jsonl,"),
      (lambda: {"data__train_files": (_write(tmp / "bad.txt", b"ok line\n\xff\xfe bad\n"),)},
       "bad.txt:2: invalid UTF-8"),
      (lambda: {"data__train_files": (_write(tmp / "bad.jsonl", b'{"txt": "x"}\n'),)},
       "bad.jsonl:1: expected a JSON object with a 'text' field"),
      (lambda: {"data__train_files": (_write(tmp / "tiny.txt", b"To be.\n"),)},
       "fewer than one row of seq_len=32"),
      (lambda: {"data__tokenizer": str(tmp / "none.model")}, "tokenizer file not found"),
      (lambda: {"data__tokenizer": _write(tmp / "junk.model", b"junk")},
       "is not a valid SentencePiece model"),
      (lambda: {"data__tokenizer": other_tok}, "differs from the tokenizer this workdir"),
      (lambda: {"data__seq_len": 4096}, "exceeds model.max_len"),
      (lambda: {"train__grad_accum_steps": 3}, "not divisible by train.grad_accum_steps=3"),
      (lambda: {"model__d_model": 64}, "holds a different architecture (model.d_model)"),
      (lambda: {"model__vocab_size": 1000}, "tokenizer has 2048 pieces but model.vocab_size=1000"),
      (lambda: {"mesh__data": 3}, "does not divide 1 devices"),
      (lambda: {"train__steps": 0}, "train.steps must be positive, got 0"),
      (lambda: {"train__init_from": str(tmp / "missing_run")}, "is not a directory"),
      (lambda: {"data__train_files": (_write(tmp / "long.txt", b"x" * (17 << 20)),)},
       "long.txt:1: line longer than 16 MiB"),
      (lambda: {"data__eval_files": (_mkdir(tmp / "no_text"),)}, "holds no .txt/.jsonl"),
      (lambda: {"data__train_files": (str(tmp / "nothing" / "*.parquet"),)}, "matches no files"),
      (lambda: {"data__train_files": (_write(tmp / "blank.jsonl", b'{"text": " "}\n'),)},
       "blank.jsonl: no documents"),
  ]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
  tmp = tmp_path_factory.mktemp("bad")
  config = tiny_config("clm_tiny", tmp, train__steps=2, train__checkpoint_every=2,
                       model__scan_layers=True)  # init_from below converts the layout
  train_lib.train_and_evaluate(experiment_from_dict(config.to_dict()), str(tmp / "run"))
  from lmjax.data.tokenizer import train_tokenizer
  train_tokenizer(["a b c d e f g"] * 50, str(tmp / "other.model"), 273)
  return tmp


def test_bad_run_inputs_change_nothing(workdir):
  run = workdir / "run"
  before = tree_digest(run)
  cases = _run_cases(workdir)
  assert len(cases) + len(CONFIG_CASES) >= 25
  for overrides, message in cases:
    config = tiny_config("clm_tiny", workdir, **{"train__steps": 2, "model__scan_layers": True,
                                                 **overrides()})
    with pytest.raises(UserError) as err:
      train_lib.train_and_evaluate(experiment_from_dict(config.to_dict()), str(run))
    assert message in str(err.value), (message, str(err.value))
    assert "\n" not in str(err.value)
    assert tree_digest(run) == before, message  # checkpoints, metrics, tokenizer untouched


def test_init_from_checks_shapes_architecture_and_tokenizer(workdir, tmp_path):
  """A fresh workdir started from `workdir`'s run: wrong shapes, other architecture
  fields and another tokenizer are refused before anything is written."""
  source = str(workdir / "run")
  cases = [({"model__d_model": 64}, "transformer/embed/positions/embedding "
                                    "has shape (256, 32) there but (256, 64) in this model"),
           ({"model__num_layers": 3}, "layers/attention/key/bias has shape (2, 2, 16) there but (3, 2, 16)"),
           ({"model__activation": "relu"}, "model.activation differ from this experiment's"),
           ({"data__tokenizer": str(workdir / "other.model"), "model__vocab_size": 2048},
            "uses another tokenizer than data.tokenizer")]
  for overrides, message in cases:
    config = tiny_config("clm_tiny", workdir, train__steps=1, train__init_from=source,
                         model__scan_layers=True, **overrides)
    target = tmp_path / "fresh"
    with pytest.raises(UserError) as err:
      train_lib.train_and_evaluate(experiment_from_dict(config.to_dict()), str(target))
    assert message in str(err.value), (message, str(err.value))
    assert not target.exists()  # checked before anything is written
  # The layout is converted; with a zero learning rate the step keeps the loaded weights.
  config = tiny_config("clm_tiny", workdir, train__steps=1, train__init_from=source,
                       model__scan_layers=False, optimizer__learning_rate=0.0)
  train_lib.train_and_evaluate(experiment_from_dict(config.to_dict()), str(tmp_path / "ok"))
  import numpy as np

  from lmjax.checkpoint import Checkpointer
  from lmjax.model.transformer import unstack_layers
  got, _ = Checkpointer(str(tmp_path / "ok"), read_only=True).restore_params(1)
  want, _ = Checkpointer(source, read_only=True).restore_params(2)
  want = unstack_layers(want, 2)
  assert jax.tree.structure(got) == jax.tree.structure(want)
  assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)))


def test_invalid_utf8_lines_can_be_skipped(workdir):
  good = (workdir / "mixed.txt")
  good.write_bytes(open(os.path.join(BUNDLED_DIR, "valid.txt"), "rb").read()[:20000] +
                   b"\n\n\xff broken line\n")
  config = tiny_config("clm_tiny", workdir, train__steps=1, data__bad_utf8="skip",
                       data__train_files=(str(good),), train__eval_batches=1)
  metrics = train_lib.train_and_evaluate(experiment_from_dict(config.to_dict()),
                                         str(workdir / "skip"))
  assert metrics["loss"] > 0
  shutil.rmtree(workdir / "skip")
