"""A chat model in use: an SFT run through launch.finetune, then launch.generate --chat,
its export answering the same in transformers, and lm-eval with --apply_chat_template."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from tiny import ROOT
from lmjax import pretrained

TINY = ["--config.train.steps=6", "--config.train.batch_size=8", "--config.train.eval_every=0",
        "--config.train.log_every=2", "--config.task.seq_len=160"]


def launch(module, *args, stdin=None, ok=True):
  proc = subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, capture_output=True,
                        text=True, timeout=600, input=stdin)
  if ok:
    assert proc.returncode == 0, proc.stderr[-3000:]
  return proc


@pytest.fixture(scope="module")
def chat_run(tiny_runs):
  out = tiny_runs / "chat"
  if not (out / "results.json").exists():
    launch("launch.finetune", "--config=experiments/chat_tiny.py", *TINY,
           f"--init_from={tiny_runs / 'clm_tiny'}", f"--workdir={out}")
  return out


def test_sft_run_keeps_its_template_and_reports_assistant_tokens(chat_run):
  result = json.loads((chat_run / "results.json").read_text())
  assert result["task"] == "sft" and 0 <= result["accuracy"] <= 1 and result["tokens"] > 0
  assert np.isfinite(result["loss"])
  assert (chat_run / "chat_template.jinja").is_file() and (chat_run / "tokenizer.model").is_file()


def test_generate_chat_answers_and_its_export_answers_the_same_in_transformers(chat_run,
                                                                               tmp_path):
  import torch
  import transformers
  from lmjax.inference.chat import ChatSession
  from lmjax.inference.generate import SamplingConfig
  question = "ROMEO.\nWho is there?\nJULIET.\n\nWho speaks first?"
  out = launch("launch.generate", f"--workdir={chat_run}", "--chat", f"--prompt={question}",
               "--temperature=0", "--max_new_tokens=12").stdout
  session = ChatSession(pretrained.load(str(chat_run)))
  messages = [{"role": "user", "content": question}]
  ours = list(session.reply(messages, SamplingConfig(max_new_tokens=12, temperature=0.0)))
  assert out.strip() == session.tokenizer.decode(ours).strip()

  launch("launch.convert", f"--input={chat_run}", f"--output={tmp_path / 'hf'}")
  tok = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "hf"))
  model = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf")).eval()
  prompt = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                   return_dict=True)["input_ids"]
  assert list(prompt) == session.prompt_ids(messages, 12)  # the template, tokenized alike
  with torch.no_grad():
    got = model.generate(torch.tensor([list(prompt)]), max_new_tokens=12, do_sample=False,
                         eos_token_id=session.end_of_turn, pad_token_id=tok.pad_token_id)
  reply = got[0, len(prompt):].tolist()
  reply = reply[:reply.index(session.end_of_turn)] if session.end_of_turn in reply else reply
  assert reply == ours

  turns = launch("launch.generate", f"--workdir={chat_run}", "--chat", "--temperature=0",
                 "--max_new_tokens=6", stdin="Who is there?\nSay more.\n").stdout
  assert turns.count("> ") == 3  # two turns, then end of input


def test_lm_eval_with_the_chat_template(chat_run):
  out = launch("launch.lm_eval", f"--workdir={chat_run}", "--tasks=lmjax_gen",
               "--include_path=tests/lm_eval_tasks", "--limit=2", "--apply_chat_template",
               "--log_samples", "--output=chat_eval.json")
  result = json.loads((chat_run / "chat_eval.json").read_text())
  prompt = result["samples"]["lmjax_gen"][0]["arguments"][0][0]  # (context, generation kwargs)
  assert prompt.startswith("<s><|user|>\n") and prompt.endswith("<|assistant|>\n")
  assert "lmjax_gen" in out.stdout
