"""A chat model in use: an SFT run through launch.finetune, then launch.generate --chat,
its export answering the same in transformers, and lm-eval with --apply_chat_template."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from tiny import ROOT, assert_same_checkpoint, kill_twice
from lmjax import pretrained

TINY = ["--config.train.steps=6", "--config.train.batch_size=8", "--config.train.eval_every=0",
        "--config.train.log_every=2", "--config.data.seq_len=160"]


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
  assert result["objective"] == "sft" and 0 <= result["accuracy"] <= 1 and result["tokens"] > 0
  assert np.isfinite(result["loss"])
  assert (chat_run / "chat_template.jinja").is_file() and (chat_run / "tokenizer.model").is_file()


def test_generate_chat_answers_and_its_export_answers_the_same_in_transformers(chat_run,
                                                                               tmp_path):
  import torch
  import transformers
  from lmjax.convert import export_hf
  from lmjax.inference.chat import ChatSession
  from lmjax.inference.generate import SamplingConfig
  question = "ROMEO.\nWho is there?\nJULIET.\n\nWho speaks first?"
  out = launch("launch.generate", f"--workdir={chat_run}", "--chat", f"--prompt={question}",
               "--temperature=0", "--max_new_tokens=12").stdout
  source = pretrained.load(str(chat_run))
  session = ChatSession(source)
  messages = [{"role": "user", "content": question}]
  ours = list(session.reply(messages, SamplingConfig(max_new_tokens=12, temperature=0.0)))
  assert out.strip() == session.tokenizer.decode(ours).strip()

  # launch.convert's export, in this process (the command itself: tests/test_use_models.py)
  export_hf(source, str(tmp_path / "hf"), None)
  tok = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "hf"))
  model = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf")).eval()
  prompt = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                   return_dict=True)["input_ids"]
  assert list(prompt) == session.prompt_ids(messages, 12)  # the template, tokenized alike
  with torch.no_grad():
    # the export's generation_config.json ends a reply at the template's end of turn
    eos = model.generation_config.eos_token_id
    assert session.end_of_turn in (eos if isinstance(eos, list) else [eos])
    got = model.generate(torch.tensor([list(prompt)]), max_new_tokens=12, do_sample=False,
                         pad_token_id=tok.pad_token_id)
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


def _subset(tmp_path, name, n):
  """The first `n` records of a bundled chat or preference file."""
  path = tmp_path / f"{name}.jsonl"
  with open(os.path.join(ROOT, "experiments", "data", f"{name}.jsonl")) as f:
    path.write_text("".join(line for _, line in zip(range(n), f)))
  return str(path)


def _run(config, init, workdir, data, *args, popen=False):
  """launch.finetune of `config` on the first records of its bundled files (written to the
  folder `data`), one device unless `args` say otherwise."""
  kind = "chat" if "chat" in config else "dpo"
  files = [f"--config.task.train_file={_subset(data, f'{kind}_train', 48)}",
           f"--config.task.eval_file={_subset(data, f'{kind}_eval', 16)}"]
  command = [sys.executable, "-m", "launch.finetune", f"--config=experiments/{config}.py",
             f"--init_from={init}", f"--workdir={workdir}", "--config.data.seq_len=160",
             "--config.train.batch_size=8", "--config.train.log_every=1",
             "--config.train.eval_every=0", "--config.optimizer.warmup_steps=1", *files, *args]
  if popen:
    return subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
  proc = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return proc


def _losses(workdir):
  return [r["loss"] for r in map(json.loads, open(workdir / "metrics.jsonl"))
          if r["split"] == "train"]


STEPS = ["--config.train.steps=8", "--config.train.checkpoint_every=2"]


@pytest.fixture(scope="module")
def straight(tiny_runs, chat_run, tmp_path_factory):
  """`straight(config)`: the folder of an uninterrupted one-device run of `config` (SFT from
  clm_tiny, DPO from the SFT run), made once: the reference of both the eight-device run
  and the run killed with -9."""
  folders = {}

  def make(config):
    if config not in folders:
      tmp = tmp_path_factory.mktemp(config)
      _run(config, _init(tiny_runs, chat_run, config), tmp / "straight", tmp, "--cpu_devices=1",
           *STEPS)
      folders[config] = tmp / "straight"
    return folders[config]
  return make


def _init(tiny_runs, chat_run, config):
  return tiny_runs / "clm_tiny" if config == "chat_tiny" else chat_run


@pytest.mark.parametrize("config", ["chat_tiny", "dpo_tiny"])
def test_eight_devices_with_fsdp_equal_one_device(tiny_runs, chat_run, straight, config):
  one = straight(config)
  eight = _run(config, _init(tiny_runs, chat_run, config), one.parent / "eight", one.parent,
               "--cpu_devices=8", "--config.mesh.data=2", "--config.mesh.fsdp=4", *STEPS)
  assert "8 device(s), mesh {'data': 2, 'fsdp': 4, 'expert': 1, 'tensor': 1}" in eight.stderr
  np.testing.assert_allclose(_losses(one.parent / "eight"), _losses(one), rtol=1e-4)
  a, b = (json.loads((d / "results.json").read_text()) for d in (one, one.parent / "eight"))
  for key in a:
    if isinstance(a[key], float):
      assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-5), key


@pytest.mark.parametrize("config", ["chat_tiny", "dpo_tiny"])
def test_kill_9_then_rerun_equals_an_uninterrupted_run(tiny_runs, chat_run, straight, config):
  reference = straight(config)
  init, killed, data = _init(tiny_runs, chat_run, config), reference.parent / "killed", \
      reference.parent
  kill_twice(lambda: _run(config, init, killed, data, "--cpu_devices=1", *STEPS, popen=True),
             killed / "metrics.jsonl", seed=0)
  _run(config, init, killed, data, "--cpu_devices=1", *STEPS)
  assert_same_checkpoint(reference, killed, 8)
  assert (json.loads((killed / "results.json").read_text()) ==
          json.loads((reference / "results.json").read_text()))


def test_sigterm_saves_the_current_step_of_a_dpo_run(chat_run, tmp_path):
  """SIGTERM is the training loop's `Preemption` hook, the same for every objective (SFT's
  loop included; tests/test_finetune_loop.py and tests/test_launch.py send it to a
  classification and a pretraining run); sent here to DPO, whose run first scores its data
  with the reference model."""
  import signal
  import time
  workdir = tmp_path / "term"
  proc = _run("dpo_tiny", chat_run, workdir, tmp_path, "--config.train.steps=400",
              "--config.train.checkpoint_every=1000", popen=True)
  deadline = time.monotonic() + 300
  while not (workdir / "metrics.jsonl").exists() or \
      (workdir / "metrics.jsonl").read_text().count("\n") < 2:
    assert time.monotonic() < deadline and proc.poll() is None
    time.sleep(0.05)
  proc.send_signal(signal.SIGTERM)
  _, err = proc.communicate(timeout=120)
  assert proc.returncode == 0 and "preempted" in err, err[-3000:]
  assert len(os.listdir(workdir / "checkpoints")) == 1


LONG = "To be, or not to be, that is the question. " * 40
BAD = [
    ("sft", {"messages": [{"content": "x"}, {"role": "assistant", "content": "y"}]},
     "message 1 needs a 'role' and a 'content'"),
    ("sft", {"messages": [{"role": "king", "content": "x"}, {"role": "assistant", "content": "y"}]},
     "message 1 has role 'king'"),
    ("sft", {"messages": [{"role": "user", "content": "x"}]}, "has no assistant turn"),
    ("sft", {"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": ""}]},
     "message 2 is an empty assistant turn"),
    ("sft", {"messages": [{"role": "user", "content": LONG}, {"role": "assistant", "content": "y"}]},
     "longer than data.seq_len=64 (set objective.truncation=drop or newest)"),
    ("dpo", {"prompt": "Who?", "chosen": "Me.", "rejected": "Me."}, "'chosen' equals 'rejected'"),
    ("dpo", {"prompt": LONG, "chosen": "Me.", "rejected": "You."}, "longer than data.seq_len=64"),
    ("template", {"messages": [{"role": "user", "content": "x"},
                               {"role": "assistant", "content": "y"}]},
     "failed to render (TemplateError: a system message first)"),
]


@pytest.mark.parametrize("kind,record,message", BAD, ids=[m for *_, m in BAD])
def test_bad_input_is_one_line_naming_the_line_and_writes_nothing(tiny_runs, tmp_path, kind,
                                                                   record, message):
  from lmjax.errors import UserError
  from lmjax.experiment import default_config
  from tiny import finetune
  good = ({"prompt": "Who?", "chosen": "Me.", "rejected": "You."} if kind == "dpo" else
          {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]})
  path = tmp_path / "data.jsonl"
  path.write_text(json.dumps(good) + "\n" + json.dumps(record) + "\n")
  config = default_config("dpo" if kind == "dpo" else "sft")
  config["task"].update(train_file=str(path), eval_file=str(path))
  config["objective"]["truncation"] = "off"
  config["data"]["seq_len"] = 64
  if kind == "template":
    template = tmp_path / "t.jinja"
    template.write_text("{% if messages[0]['role'] != 'system' %}"
                        "{{ raise_exception('a system message first') }}{% endif %}")
    config["objective"]["chat_template"] = str(template)
  with pytest.raises(UserError) as err:
    finetune(config, tiny_runs / "clm_tiny", tmp_path / "run")
  text = str(err.value)
  line = 1 if kind == "template" else 2
  assert text.startswith(f"{path}:{line}") and message in text and "\n" not in text, text
  assert not (tmp_path / "run").exists()


def test_dpo_without_init_from_exits_2(tmp_path):
  proc = launch("launch.finetune", "--config=experiments/dpo_tiny.py",
                f"--workdir={tmp_path / 'run'}", ok=False)
  assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
      "error: flag --init_from=None: Flag --init_from must have a value other than None."]
  assert not (tmp_path / "run").exists()


def test_post_training_benchmark_runs(chat_run, tmp_path):
  out = tmp_path / "post.json"
  # one layer: the four step kinds compiled unrolled, the figures' code path, not their size
  proc = launch("benchmarks.post_training", "--tiny", "--layers=1", f"--sft_run={chat_run}",
                f"--json={out}")
  result = json.loads(out.read_text())
  steps = result["steps"]
  assert steps["sft_tokens_per_s"] > 0 and steps["dpo_vs_sft_step"] > 0
  assert 0 < steps["packing_loss_share"] < steps["packing_real_share"] <= 1
  assert result["before_dpo"]["pairs"] > 0 and "SFT" in proc.stdout and "DPO step" in proc.stdout


def test_a_long_conversation_keeps_its_newest_turns_within_the_model(chat_run):
  from lmjax.inference.chat import ChatSession
  session = ChatSession(pretrained.load(str(chat_run)))
  turns = [{"role": "system", "content": "Answer briefly."}]
  for i in range(40):
    turns += [{"role": "user", "content": f"Line {i}: what light through yonder window breaks?"},
              {"role": "assistant", "content": "It is the east, and Juliet is the sun."}]
  turns.append({"role": "user", "content": "And now?"})
  ids = session.prompt_ids(turns, 16)
  text = session.tokenizer.decode(ids)
  assert len(ids) + 16 <= session.max_len and "Answer briefly." in text  # system kept
  assert "Line 0:" not in text and "Line 39:" in text  # the oldest turns are gone
  assert text.endswith("And now?\n<|assistant|>\n")  # then the generation prompt
