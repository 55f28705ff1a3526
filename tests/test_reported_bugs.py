"""Bugs reported by users, each tested the way the real files and commands are."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from tiny import ROOT
from lmjax.data import BUNDLED_DIR

VALID = os.path.join(BUNDLED_DIR, "valid.txt")


def _cli(*args, timeout=300):
  return subprocess.run([sys.executable, "-m", *args], cwd=ROOT, capture_output=True, text=True,
                        timeout=timeout)


def _one_line_error(proc):
  assert proc.returncode == 2, proc.stderr[-2000:]
  lines = [l for l in proc.stderr.splitlines() if l.strip() and not l.startswith(("I1", "W1"))]
  assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr[-2000:]
  assert "Traceback" not in proc.stderr
  return lines[0]


def test_tokenizer_json_with_padding_and_truncation_encodes_everything(tmp_path):
  """sentence-transformers' MiniLM ships a tokenizer.json that pads and truncates at 128."""
  import tokenizers
  from lmjax.data.hf_tokenizer import HFTokenizer
  tok = tokenizers.BertWordPieceTokenizer(lowercase=True)
  lines = open(VALID).read().splitlines()[:2000]
  tok.train_from_iterator(lines, vocab_size=400,
                          special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"])
  tok.enable_padding(length=128, pad_id=0, pad_token="[PAD]")
  tok.enable_truncation(max_length=128)
  tok.save(str(tmp_path / "tokenizer.json"))
  assert json.loads((tmp_path / "tokenizer.json").read_text())["padding"] is not None
  ours = HFTokenizer(str(tmp_path))
  short, long = "To be, or not to be", " ".join(lines[:60])
  unpadded = tokenizers.Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
  unpadded.no_padding()
  unpadded.no_truncation()
  want = [e.ids for e in unpadded.encode_batch([short, long], add_special_tokens=False)]
  got = ours.encode([short, long])
  assert got == want and len(got[0]) < 20 and 0 not in got[0] and len(got[1]) > 128


def test_evaluate_on_a_bert_model_without_mlm_head_is_one_line(tmp_path):
  import torch
  import transformers as T
  from hf_models import make_hf_model
  make_hf_model("bert", str(tmp_path / "mlm"))
  headless = T.BertModel(T.BertConfig.from_pretrained(str(tmp_path / "mlm")))
  torch.manual_seed(0)
  headless.save_pretrained(str(tmp_path / "bert"))
  for name in ("vocab.txt", "tokenizer_config.json"):
    (tmp_path / "bert" / name).write_bytes((tmp_path / "mlm" / name).read_bytes())
  line = _one_line_error(_cli("launch.evaluate", f"--workdir={tmp_path / 'bert'}",
                              f"--data={VALID}", "--max_batches=1", "--seq_len=32"))
  assert "lacks" in line and "MLM head" in line
  assert not (tmp_path / "bert" / "evaluation.json").exists()


def _cjk_lines(n=2000):
  """Zipf-distributed CJK characters: more distinct characters than a small vocabulary."""
  rng = np.random.default_rng(0)
  chars = [chr(c) for c in range(0x4E00, 0x4E00 + 3000)]
  p = 1 / np.arange(1, 3001) ** 2
  return ["".join(rng.choice(chars, 40, p=p / p.sum())) for _ in range(n)]


def test_character_coverage_reaches_sentencepiece(tmp_path):
  (tmp_path / "cjk.txt").write_text("\n".join(_cjk_lines()), encoding="utf-8")
  args = ["launch.train_tokenizer", f"--input={tmp_path / 'cjk.txt'}",
          f"--output={tmp_path / 'cjk.model'}", "--vocab_size=600"]
  assert "character_coverage" in _one_line_error(_cli(*args))
  proc = _cli(*args, "--character_coverage=0.98")
  assert proc.returncode == 0, proc.stderr[-2000:]
  from lmjax.data import Tokenizer
  tok = Tokenizer(str(tmp_path / "cjk.model"))
  text = _cjk_lines(3)[2]
  assert tok.vocab_size == 600 and tok.decode(tok.encode([text])[0]) == text  # byte fallback


def test_exported_run_names_its_own_special_ids_and_autotokenizer_loads_it(tiny_runs, tmp_path):
  import transformers as T
  from lmjax import pretrained
  out = tmp_path / "exported"
  proc = _cli("launch.convert", f"--input={tiny_runs / 'clm_tiny'}", f"--output={out}")
  assert proc.returncode == 0, proc.stderr[-2000:]
  ours = pretrained.load(str(tiny_runs / "clm_tiny")).tokenizer
  config = json.loads((out / "config.json").read_text())
  assert (config["bos_token_id"], config["eos_token_id"]) == (ours.special.bos, ours.special.eos)
  hf = T.AutoTokenizer.from_pretrained(str(out))
  assert (hf.bos_token_id, hf.eos_token_id, hf.pad_token_id) == (
      ours.special.bos, ours.special.eos, ours.special.pad)
  text = "ROMEO. But soft, what light through yonder window breaks?"
  assert hf(text, add_special_tokens=False)["input_ids"] == ours.encode([text])[0]
  model = T.AutoModelForCausalLM.from_pretrained(str(out))
  assert model.generation_config.eos_token_id == ours.special.eos


@pytest.mark.parametrize("args,message", [
    (["--config.train.batch_size=0"], "train.batch_size must be positive, got 0"),
    (["--config.model.d_model=-1"], "model.d_model must be positive, got -1"),
    (["--config=experiments/nonexistent.py"], "No such file or directory"),
    (["--config=experiments/clm_tiny.py:bogus"], "clm_tiny variants are gpt2 and llama"),
    (["WORKDIR_IS_A_FILE"], "is a file; give a directory"),
])
def test_reported_tracebacks_are_one_line(tmp_path, args, message):
  workdir = tmp_path / "run"
  if args == ["WORKDIR_IS_A_FILE"]:
    workdir.write_text("notes")
    args = []
  config = [a for a in args if a.startswith("--config=")] or ["--config=experiments/clm_tiny.py"]
  rest = [a for a in args if not a.startswith("--config=")]
  proc = _cli("launch.train", *config, f"--workdir={workdir}", "--config.train.steps=1", *rest)
  assert message in _one_line_error(proc)
  assert not workdir.exists() or workdir.is_file()


def _numeric_fields(config: dict) -> list[tuple[str, str]]:
  return [(section, key) for section, fields in config.items() for key, value in fields.items()
          if isinstance(value, (int, float)) and not isinstance(value, bool)]


def _walk(base: dict, start, workdir) -> tuple[int, int]:
  """Puts 0, -1 and a string in each numeric field of `base` in turn and calls `start` on
  the config: it must start (return) or raise one line, leaving `workdir` unwritten.
  Returns (started, refused)."""
  from lmjax.errors import UserError
  started = refused = 0
  for section, key in _numeric_fields(base):
    for value in (0, -1, "x"):
      config = {s: dict(v) for s, v in base.items()}
      config[section][key] = value
      try:
        start(config)
        started += 1
      except UserError as e:
        assert "\n" not in str(e) and str(e), (section, key, value, str(e))
        refused += 1
      assert not workdir.exists(), (section, key, value)
  return started, refused


def test_every_numeric_field_of_the_train_launcher_starts_or_fails_in_one_line(tmp_path):
  """0, -1 and a string in each numeric field of the config `launch.train` reads."""
  from lmjax import train as train_lib
  from lmjax.experiment import experiment_from_dict
  from tiny import tiny_config
  # One layer: each config that starts traces its train step, and a second layer of the
  # same code adds tracing time, not cases (model.num_layers itself is walked as any field).
  base = tiny_config("clm_tiny", tmp_path, model__num_layers=1).to_dict()
  assert len(_numeric_fields(base)) >= 40
  workdir = tmp_path / "run"
  started, refused = _walk(base, lambda c: train_lib.dry_run(experiment_from_dict(c),
                                                              str(workdir)), workdir)
  assert started > 20 and refused > 60


def test_every_numeric_field_of_the_finetune_launcher_starts_or_fails_in_one_line(
    tiny_runs, tmp_path, monkeypatch):
  import functools
  from experiments import finetune_pairs
  from lmjax import pretrained
  from lmjax.experiment import experiment_from_dict
  from lmjax.run import dry_run
  # The walk checks the config, not the reading of init_from: read it once, not per field.
  monkeypatch.setattr(pretrained, "load", functools.lru_cache(pretrained.load))
  base = finetune_pairs.get_config().to_dict()
  base["data"]["seq_len"] = 32
  # Each config that passes its checks reads the task's files: their first records will do.
  for key in ("train_file", "eval_file"):
    with open(base["task"][key]) as f:
      (tmp_path / os.path.basename(base["task"][key])).write_text(
          "".join(line for _, line in zip(range(96), f)))
    base["task"][key] = str(tmp_path / os.path.basename(base["task"][key]))
  base["train"]["init_from"] = str(tiny_runs / "mlm_tiny")
  assert len(_numeric_fields(base)) >= 25
  workdir = tmp_path / "run"
  started, refused = _walk(base, lambda c: dry_run(experiment_from_dict(c), str(workdir)),
                           workdir)
  assert started > 10 and refused > 40
