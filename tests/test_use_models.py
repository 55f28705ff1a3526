"""The launchers that use trained models, as a user runs them: generate, fill_mask,
evaluate, convert and finetune, on tiny clm/mlm runs and on Hugging Face directories."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from lmjax import pretrained
from lmjax.data import BUNDLED_DIR
from tiny import ROOT

VALID = os.path.join(BUNDLED_DIR, "valid.txt")


def launch(module, *args, stdin=None):
  proc = subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, capture_output=True,
                        text=True, timeout=300, input=stdin)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return proc


@pytest.fixture
def runs(tiny_runs):
  return tiny_runs


def test_generate_from_a_run_and_from_gpt2(runs, caplog):
  out = launch("launch.generate", f"--workdir={runs / 'clm_tiny'}", "--prompt=ROMEO.",
               "--max_new_tokens=12", "--num_samples=2", "--seed=3").stdout
  assert out.count("--- sample") == 2 and out.count("ROMEO.") == 2
  # seeded: the same samples again, here in process with the command's defaults and seed
  from lmjax.inference import generation_config
  from lmjax.inference.generate import Generator, SamplingConfig
  source = pretrained.load(str(runs / "clm_tiny"))
  tok = source.tokenizer
  gen = Generator(source.model, source.params, eos=generation_config.for_model(source).eos_ids,
                  pad=max(tok.special.pad, 0))
  prompt = [tok.special.bos] + tok.encode(["ROMEO."])[0]
  again = gen.generate([prompt] * 2, SamplingConfig(12, 0.8, 0, 0.95), 3)
  assert out == "".join(f"--- sample {i + 1}\nROMEO.{tok.decode(ids)}\n"
                        for i, ids in enumerate(again))
  # a Hugging Face GPT-2 as launch.generate --dtype=bfloat16 loads it, in process (the
  # command on a Hugging Face directory: the interactive test below)
  import logging
  with caplog.at_level(logging.INFO):
    hf = pretrained.load(str(runs / "gpt2"), "bfloat16", announce=True)
  assert "computes in bfloat16 (--dtype)" in caplog.text
  greedy = Generator(hf.model, hf.params, eos=generation_config.for_model(hf).eos_ids,
                     pad=max(hf.tokenizer.special.pad, 0))
  ids = [hf.tokenizer.special.bos] if hf.tokenizer.special.bos >= 0 else []
  (new,) = greedy.generate([ids + hf.tokenizer.encode(["To be"])[0]],
                           SamplingConfig(5, temperature=0.0))
  assert len(new) <= 5 and isinstance(hf.tokenizer.decode(new), str)


def test_interactive_generation_streams_and_keeps_the_conversation(runs):
  proc = launch("launch.generate", f"--workdir={runs / 'llama'}", "--interactive",
                "--max_new_tokens=6", "--temperature=0", stdin="Who is there?\nSay more.\n")
  assert proc.stdout.count("> ") == 3  # two turns, then end of input

  from lmjax.inference.generate import Generator, SamplingConfig
  source = pretrained.load(str(runs / "llama"))
  tok = source.tokenizer
  gen = Generator(source.model, source.params, tok.special.eos, tok.special.pad)
  cfg = SamplingConfig(max_new_tokens=6)
  history = [tok.special.bos] + tok.encode(["Who is there?\n"])[0]
  first = list(gen.stream(history, cfg))
  history += first + tok.encode(["Say more.\n"])[0]
  second = list(gen.stream(history, cfg))  # the reply to turn 2 sees turn 1 and its reply
  replies = [line for line in proc.stdout.split("> ") if line.strip()]
  assert replies[0].strip() == tok.decode(first).strip()
  assert replies[1].strip() == tok.decode(second).strip()


def test_fill_mask_on_a_run_and_on_bert(runs):
  out = launch("launch.fill_mask", f"--workdir={runs / 'mlm_tiny'}",
               "--text=To be, or not to <mask>, that is the <mask>.").stdout
  assert out.count("<mask>") == 2 and len(out.strip().splitlines()) == 12
  probs = [float(line.split()[0]) for line in out.splitlines() if not line.startswith("<")]
  assert all(0 <= p <= 1 for p in probs) and probs[:5] == sorted(probs[:5], reverse=True)
  # a Hugging Face BERT, in process (the command's path is the run's above)
  from lmjax.inference.fill_mask import fill_mask
  bert = pretrained.load(str(runs / "bert"))
  (candidates,) = fill_mask(bert.model, bert.params, bert.tokenizer, "to be or <mask>", 3)
  assert len(candidates) == 3 and all(0 <= p <= 1 for _, p in candidates)


@pytest.mark.parametrize("name", ["clm_tiny", "llama"])  # an MLM run: the test below
def test_evaluate_writes_deterministic_json(runs, name, tmp_path):
  args = [f"--workdir={runs / name}", f"--data={VALID}", "--max_batches=2", "--seq_len=32"]
  # a run keeps its results inside; a Hugging Face directory is left as it is
  written = runs / name / "evaluation.json" if name != "llama" else tmp_path / "llama.json"
  proc = launch("launch.evaluate", *args, *([f"--output={written}"] if name == "llama" else []))
  first = json.loads(proc.stdout)
  assert f"computes in {first['dtype']} (model.dtype=" in proc.stderr
  assert first == json.loads(written.read_text()) and first["tokens"] > 0
  assert np.isfinite(first["loss"])
  assert first["dtype"] == "float32"  # llama: its config.json; the runs: the suite's pin
  assert "perplexity" in first
  from lmjax.evaluation import evaluate_files
  again = evaluate_files(pretrained.load(str(runs / name)), [VALID], 32, 8, 2)
  assert again["loss"] == first["loss"] and again["accuracy"] == first["accuracy"]


def test_an_mlm_run_evaluates_without_perplexity(runs):
  """launch.evaluate's evaluation of an MLM run, in process (the command around it is the
  same for every source: the cases above): no perplexity, and the same numbers twice."""
  from lmjax.evaluation import evaluate_files
  first, again = (evaluate_files(pretrained.load(str(runs / "mlm_tiny")), [VALID], 32, 8, 2)
                  for _ in range(2))
  assert "perplexity" not in first and first["tokens"] > 0 and np.isfinite(first["loss"])
  assert first == again


@pytest.mark.parametrize("name,cls", [("clm_tiny", "GPT2LMHeadModel"),
                                      ("mlm_tiny", "BertForMaskedLM")])
def test_convert_exports_a_run_that_transformers_loads(runs, name, cls, tmp_path):
  """clm_tiny through launch.convert; mlm_tiny through its export_hf, in process."""
  import torch
  import transformers
  out = tmp_path / "hf"
  if name == "clm_tiny":
    assert "identical" in launch("launch.convert", f"--input={runs / name}",
                                 f"--output={out}").stdout
  else:
    from lmjax.convert import export_hf
    export_hf(pretrained.load(str(runs / name)), str(out))
  model = getattr(transformers, cls).from_pretrained(str(out)).eval()
  source = pretrained.load(str(runs / name))
  tokens = np.array([[2, 50, 60, 70, 80, 3]])
  from lmjax.model import build_model
  want = np.asarray(build_model(source.model).apply({"params": source.params}, tokens))
  with torch.no_grad():
    got = model(input_ids=torch.tensor(tokens)).logits.numpy()
  np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)


def test_finetune_from_a_run_and_from_bert_then_resume(runs, tmp_path):
  args = ["--config=experiments/finetune_genre.py", "--config.train.steps=4",
          "--config.train.batch_size=8", "--config.train.eval_every=4",
          "--config.data.seq_len=32"]
  out = launch("launch.finetune", *args, f"--init_from={runs / 'mlm_tiny'}",
               f"--workdir={tmp_path / 'a'}").stdout
  result = json.loads(out[out.index("{"):])
  assert result["examples"] == 770 and 0 <= result["accuracy"] <= 1
  assert json.loads((tmp_path / "a" / "results.json").read_text()) == result

  from experiments import finetune_genre
  from tiny import finetune
  config = finetune_genre.get_config()
  config.train.update(steps=6, batch_size=8, eval_every=0)
  config.data.seq_len = 32
  more = finetune(config.to_dict(), runs / "mlm_tiny", tmp_path / "a")
  assert more["steps"] == 6 and (tmp_path / "a" / "checkpoints" / "6").is_dir()
  config.train.steps = 2
  from_hf = finetune(config.to_dict(), runs / "bert", tmp_path / "b")
  assert from_hf["examples"] == 770
