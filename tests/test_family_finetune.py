"""Fine-tuning starts from each of today's families' Hugging Face directories, and the trained
run goes back out.

For the families' tiny random models (tests/hf_models.py), experiments/chat_tiny.py (SFT,
lmjax's default chat template) trains two steps from the directory, one family through the
`launch.finetune` command and the others through the same experiment in this process
(sharing its imports; each family's cost is mostly XLA compiling its train and eval steps);
the run keeps the model's
generation_config.json (its eos ids); exported, the trained run loads in transformers with
no missing or unexpected weights and gives lmjax's logits within 1e-4 in float32, past every
sliding window.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from experiments import chat_tiny
from hf_models import load_causal_lm, make_family_model
from lmjax import pretrained
from lmjax.convert import export_hf
from lmjax.experiment import experiment_from_dict
from lmjax.model import build_model
from lmjax.run import train_and_evaluate
from tiny import ROOT

# Every family's weight layout and training-time options: RoPE scaling (Llama 3, Qwen3's
# YaRN), a window on every layer (Mistral), biases and a tied head (Qwen2), qk-norm and
# head_dim apart from d_model (Qwen3), attention soft-caps (Gemma 2), sandwich norms, local
# and global layers with their own RoPE (Gemma 3), fused weights (Phi-3), post-norms and
# whole-projection qk-norm (OLMo 2).
NAMES = ["llama3", "mistral", "qwen2", "qwen3", "gemma2", "gemma3_text", "phi3", "olmo2"]
CLI = "mistral"  # the family that goes through `python -m launch.finetune`
OPTIONS = {"data.seq_len": 160, "train.batch_size": 4, "train.steps": 2,
           "train.eval_every": 0, "optimizer.warmup_steps": 1, "train.log_every": 1}


@pytest.fixture(scope="module")
def chat_files(tmp_path_factory) -> dict[str, str]:
  """16 training and 4 held-out conversations of chat_tiny's files, shared by the families."""
  tmp, out = tmp_path_factory.mktemp("chat"), {}
  for name, n in (("train", 16), ("eval", 4)):
    path = tmp / f"chat_{name}.jsonl"
    with open(os.path.join(ROOT, "experiments", "data", f"chat_{name}.jsonl")) as f:
      path.write_text("".join(line for _, line in zip(range(n), f)))
    out[f"task.{name}_file"] = str(path)
  return out


def _finetune(name: str, init, run, files: dict[str, str]) -> None:
  options = {**OPTIONS, **files}
  if name == CLI:
    proc = subprocess.run(
        [sys.executable, "-m", "launch.finetune", "--config=experiments/chat_tiny.py",
         f"--init_from={init}", f"--workdir={run}",
         *(f"--config.{key}={value}" for key, value in options.items())],
        cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return
  config = chat_tiny.get_config().to_dict()
  for key, value in options.items():
    section, field = key.split(".")
    config[section][field] = value
  config["train"]["init_from"] = str(init)
  train_and_evaluate(experiment_from_dict(config), str(run))


@pytest.mark.parametrize("name", NAMES)
def test_sft_from_each_familys_directory_and_its_export(name, chat_files, tmp_path):
  init, run, out = tmp_path / "hf", tmp_path / "run", tmp_path / "out"
  make_family_model(name, str(init))
  with open(init / "generation_config.json", "w") as f:
    json.dump({"eos_token_id": [2, 7], "do_sample": True, "temperature": 0.6}, f)
  _finetune(name, init, run, chat_files)
  losses = [r["loss"] for r in map(json.loads, open(run / "metrics.jsonl"))
            if r["split"] == "train"]
  assert len(losses) == 2 and all(np.isfinite(losses))
  source, trained = pretrained.load(str(init)), pretrained.load(str(run))
  assert trained.model == source.model.replace(dropout_rate=trained.model.dropout_rate)
  moved = jax.tree.map(lambda a, b: not np.array_equal(a, b), source.params, trained.params)
  assert all(jax.tree.leaves(moved))  # every weight trained
  assert trained.generation["eos_token_id"] == [2, 7]

  export_hf(trained, str(out), "phi3" if name == "phi3" else None)
  model, info = load_causal_lm(str(out), loading_info=True)
  assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
  tokens = np.random.default_rng(0).integers(5, 300, size=(1, 150))
  with torch.no_grad():
    want = model(input_ids=torch.tensor(tokens)).logits.numpy()
  got = jax.jit(build_model(trained.model).apply)({"params": trained.params},
                                                  jnp.asarray(tokens))
  np.testing.assert_allclose(np.asarray(got), want, atol=1e-4, rtol=1e-4)
