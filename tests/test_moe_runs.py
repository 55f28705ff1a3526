"""Mixtures of experts in use: moe_tiny trains through launch.train with its router measures
in the train line, metrics.jsonl and TensorBoard, survives kill -9 and resumes bitwise; bad
MoE settings are one line and exit 2; an imported Mixtral is fine-tuned (chat SFT); and an
imported Mixtral generates greedily what transformers generates, through launch.generate.
(The launchers' path is the same for every family: Mixtral's, Qwen3-MoE's and OLMoE's
tokens through the Engine launch.serve runs and the Generator launch.generate runs are
checked against transformers in tests/test_family_generation.py.)"""

import glob
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from hf_models import make_family_model
from tiny import ROOT, TINY_OVERRIDES, assert_same_checkpoint, kill_once

STEPS = 8  # room for a kill between checkpoints; two evals
MOE_TINY = {**TINY_OVERRIDES, "model.moe.d_ff": 32, "train.steps": STEPS,
            "train.checkpoint_every": 2, "train.log_every": 1, "train.eval_every": 4}


def _command(tmp_path, workdir, *extra, config="experiments/moe_tiny.py"):
  values = {**MOE_TINY, "data.cache_dir": str(tmp_path / "cache")}
  return [sys.executable, "-m", "launch.train", f"--config={config}", f"--workdir={workdir}",
          *[f"--config.{k}={v}" for k, v in values.items()], *extra]


def _in_process(tmp_path, workdir, arg=None, **changes):
  """launch.train's run of moe_tiny (MOE_TINY's flags and `changes`), in this process."""
  from lmjax.experiment import experiment_from_dict
  from lmjax.run import train_and_evaluate
  from tiny import tiny_config
  values = {**MOE_TINY, **changes}
  config = tiny_config("moe_tiny", tmp_path, arg, **{k.replace(".", "__"): v
                                                     for k, v in values.items()})
  return train_and_evaluate(experiment_from_dict(config.to_dict()), str(workdir))


def test_moe_tiny_reports_its_router_and_survives_kill_9_bitwise(tmp_path, caplog):
  """The uninterrupted run in process (its log lines as launch.train writes them); the
  killed and rerun one through launch.train."""
  import logging
  straight = tmp_path / "straight"
  with caplog.at_level(logging.INFO):
    _in_process(tmp_path, straight)
  assert "M active per token" in caplog.text  # both parameter counts
  assert "| balance " in caplog.text and "| router z " in caplog.text  # the train line
  records = [json.loads(line) for line in open(straight / "metrics.jsonl")]
  train = [r for r in records if r["split"] == "train"]
  evals = [r for r in records if r["split"] == "eval"]
  assert len(train) == STEPS and len(evals) == 2
  assert all(r["router_balance"] > 0 and r["router_z"] > 0 for r in train)
  for layer in range(2):  # each layer's expert shares sum to 1; dropless drops nothing
    shares = [evals[-1][f"router_load/layer{layer}/expert{e}"] for e in range(8)]
    assert sum(shares) == pytest.approx(1.0, abs=1e-5) and max(shares) < 1
    assert evals[-1][f"router_dropped/layer{layer}"] == 0
  events = open(glob.glob(str(straight / "tensorboard" / "events*"))[0], "rb").read()
  assert b"train/router_balance" in events and b"eval/router_load/layer1/expert7" in events

  killed = tmp_path / "killed"
  kill_once(subprocess.Popen(_command(tmp_path, killed), cwd=ROOT, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL, start_new_session=True),
            killed / "metrics.jsonl")
  final = subprocess.run(_command(tmp_path, killed), cwd=ROOT, capture_output=True, text=True,
                         timeout=600)
  assert final.returncode == 0, final.stderr[-3000:]
  assert_same_checkpoint(straight, killed, STEPS)  # params, optimizer state, step, rng


def test_capacity_variant_counts_dropped_tokens(tmp_path):
  """moe_tiny:capacity at factor 0.5: a share of each layer's assignments is dropped."""
  workdir = tmp_path / "run"
  _in_process(tmp_path, workdir, "capacity", **{"train.steps": 4,
                                                "model.moe.capacity_factor": 0.5})
  last = [json.loads(line) for line in open(workdir / "metrics.jsonl")][-1]
  assert last["split"] == "eval"
  assert all(0 < last[f"router_dropped/layer{i}"] < 1 for i in range(2)), last


@pytest.mark.parametrize("flags,devices,message", [
    (["--config.model.moe.experts_per_token=9"], 1,
     "model.moe.experts_per_token=9 exceeds model.moe.num_experts=8"),
    (["--config.mesh.expert=3"], 3, "mesh.expert=3 does not divide model.moe.num_experts=8"),
])
def test_bad_moe_input_is_one_line_and_exit_2(tmp_path, flags, devices, message):
  env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
  proc = subprocess.run(_command(tmp_path, tmp_path / "run", *flags), cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=300)
  assert proc.returncode == 2, proc.stderr[-3000:]
  last = proc.stderr.strip().splitlines()[-1]
  assert last.startswith("error: ") and message in last and "Traceback" not in proc.stderr


@pytest.mark.parametrize("factor", [0, -0.5])
def test_a_capacity_factor_not_above_0_is_one_line(tmp_path, factor):
  """The UserError launch.train turns into one line and exit 2 (as the cases above show)."""
  from lmjax.errors import UserError
  from lmjax.experiment import experiment_from_dict
  from tiny import tiny_config
  config = tiny_config("moe_tiny", tmp_path, model__moe__capacity_factor=factor)
  with pytest.raises(UserError, match="model.moe.capacity_factor") as refused:
    experiment_from_dict(config.to_dict())
  assert "\n" not in str(refused.value)


def test_chat_sft_from_an_imported_mixtral(tmp_path):
  """launch.finetune's chat SFT (as tiny.finetune runs it, in process) from a Hugging Face
  Mixtral directory: its experts train with the router's losses reported, and the result
  exports back as Mixtral (launch.convert's export_hf, in process: the command itself is
  tests/test_use_models.py's convert test) and reads back identical."""
  import jax
  from lmjax import pretrained
  from lmjax.convert import export_hf
  from lmjax.model import stack_layers
  from experiments import chat_tiny
  from tiny import finetune
  make_family_model("mixtral", str(tmp_path / "hf"))
  out = tmp_path / "sft"
  config = chat_tiny.get_config()
  config.train.update(steps=4, batch_size=4, eval_every=0, log_every=1)
  config.data.seq_len = 128
  finetune(config.to_dict(), tmp_path / "hf", out)
  records = [json.loads(line) for line in open(out / "metrics.jsonl")]
  train = [r for r in records if r["split"] == "train"]
  assert len(train) == 4 and all(r["router_balance"] > 0 for r in train)
  assert all(np.isfinite(r["loss"]) for r in train)
  assert "router_load/layer2/expert3" in records[-1]  # the final eval: Mixtral's 4 experts
  trained = pretrained.load(str(out))
  export_hf(trained, str(tmp_path / "back"))
  back = pretrained.load(str(tmp_path / "back"))
  layout = lambda params: stack_layers(params, trained.model.num_layers)  # as launch.convert
  assert jax.tree.all(jax.tree.map(np.array_equal, layout(back.params), layout(trained.params)))
  assert json.loads((tmp_path / "back" / "config.json").read_text())["model_type"] == "mixtral"


def _transformers_greedy(directory, prompt, new_tokens):
  """(prompt's ids as lmjax encodes them, the text transformers' greedy decoding adds)."""
  import torch
  from hf_models import load_causal_lm
  from lmjax import pretrained
  tok = pretrained.load(directory).tokenizer
  ids = [tok.special.bos] + tok.encode([prompt])[0]
  model = load_causal_lm(directory)
  with torch.no_grad():
    out = model.generate(torch.tensor([ids]), max_new_tokens=new_tokens, do_sample=False,
                         eos_token_id=tok.special.eos, pad_token_id=tok.special.eos)
  new = out[0, len(ids):].tolist()
  new = new[:new.index(tok.special.eos)] if tok.special.eos in new else new
  return tok.decode(new)


def test_greedy_generation_equals_transformers_through_generate(tmp_path):
  """launch.generate on an imported Mixtral. The serving Engine launch.serve runs gives
  transformers' greedy tokens on Mixtral in tests/test_family_generation.py
  (test_greedy_tokens_equal_transformers_generate[mixtral]), and launch.serve's command
  itself, the same for every family, is tested there on Gemma 3."""
  family = "mixtral"
  directory = str(tmp_path / family)
  make_family_model(family, directory)
  prompt = "First Citizen:"
  want = _transformers_greedy(directory, prompt, 24)
  out = subprocess.run([sys.executable, "-m", "launch.generate", f"--workdir={directory}",
                        f"--prompt={prompt}", "--temperature=0", "--max_new_tokens=24"],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-3000:]
  assert out.stdout == prompt + want + "\n"


def test_a_routed_mlm_trains_and_fine_tunes_a_task_head(tmp_path):
  """mlm_tiny with routed MLPs pretrains (MLM) and fine-tunes a classification head
  (finetune_genre) from its run: the router's losses join both objectives."""
  from experiments import finetune_genre
  from lmjax import train as train_lib
  from lmjax.experiment import experiment_from_dict
  from tiny import finetune, tiny_config
  config = tiny_config("mlm_tiny", tmp_path, train__steps=4, train__eval_every=4,
                       model__moe__num_experts=4, model__moe__experts_per_token=2)
  train_lib.train_and_evaluate(experiment_from_dict(config.to_dict()), str(tmp_path / "mlm"))
  records = [json.loads(line) for line in open(tmp_path / "mlm" / "metrics.jsonl")]
  assert all(r["router_balance"] > 0 for r in records)
  assert "router_load/layer1/expert3" in records[-1]
  genre = finetune_genre.get_config()
  genre.train.update(steps=2, batch_size=8, eval_every=0, log_every=1, eval_batches=2)
  genre.data.seq_len = 32
  result = finetune(genre.to_dict(), tmp_path / "mlm", tmp_path / "genre")
  assert result["steps"] == 2
  train = [json.loads(line) for line in open(tmp_path / "genre" / "metrics.jsonl")
           if '"train"' in line]
  assert train and all(r["router_balance"] > 0 for r in train)
