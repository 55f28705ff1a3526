"""A chat model in use: an SFT run through launch.finetune, then launch.generate --chat,
its export answering the same in transformers, and lm-eval with --apply_chat_template."""

import importlib
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from tiny import ROOT, assert_same_checkpoint, finetune
from lmjax import pretrained

# The runs of this module: eight steps on the first records of the bundled files, a
# checkpoint every two, one device unless said otherwise; a constant learning rate, so a
# longer run's first eight steps are the same.
SETTINGS = {"data.seq_len": 160, "train.batch_size": 8, "train.log_every": 1,
            "train.eval_every": 8, "optimizer.warmup_steps": 1, "optimizer.schedule": "constant"}
STEPS = {"train.steps": 8, "train.checkpoint_every": 2}


def launch(module, *args, stdin=None, ok=True):
  proc = subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, capture_output=True,
                        text=True, timeout=600, input=stdin)
  if ok:
    assert proc.returncode == 0, proc.stderr[-3000:]
  return proc


def _subset(folder, name, n):
  """The first `n` records of a bundled chat or preference file."""
  os.makedirs(folder, exist_ok=True)
  path = os.path.join(folder, f"{name}.jsonl")
  with open(os.path.join(ROOT, "experiments", "data", f"{name}.jsonl")) as f:
    text = "".join(line for _, line in zip(range(n), f))
  with open(path, "w") as f:
    f.write(text)
  return path


def _files(config, data):
  kind = "chat" if "chat" in config else "dpo"
  return {"task.train_file": _subset(data, f"{kind}_train", 48),
          "task.eval_file": _subset(data, f"{kind}_eval", 16)}


def _run(config, init, workdir, data, *args, popen=False, stderr=None):
  """launch.finetune of `config` with SETTINGS on the first records of its bundled files
  (written to the folder `data`), and `args`; `popen`: started in a session of its own,
  its stderr to `stderr`."""
  values = {**SETTINGS, **_files(config, data)}
  command = [sys.executable, "-m", "launch.finetune", f"--config=experiments/{config}.py",
             f"--init_from={init}", f"--workdir={workdir}",
             *[f"--config.{k}={v}" for k, v in values.items()], *args]
  if popen:
    return subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=stderr,
                            text=True, start_new_session=True)
  proc = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return proc


def _in_process(config, init, workdir, data):
  """The run `_run(config, init, workdir, data, *STEPS flags)` makes, made in this process
  (tiny.finetune: the experiment launch.finetune builds from the same flags)."""
  c = importlib.import_module(f"experiments.{config}").get_config().to_dict()
  for key, value in {**SETTINGS, **STEPS, **_files(config, data)}.items():
    section, field = key.split(".")
    c[section][field] = value
  return finetune(c, init, workdir)


STEP_FLAGS = [f"--config.{k}={v}" for k, v in STEPS.items()]


@pytest.fixture(scope="module")
def chat_run(tiny_runs):
  """launch.finetune of chat_tiny from clm_tiny: the SFT run the tests use, the start of
  the DPO runs and the reference of chat_tiny's eight-device run."""
  out = tiny_runs / "chat"
  if not (out / "results.json").exists():
    _run("chat_tiny", tiny_runs / "clm_tiny", out, tiny_runs / "chat_data", "--cpu_devices=1",
         *STEP_FLAGS)
  return out


def test_sft_run_keeps_its_template_and_reports_assistant_tokens(chat_run):
  result = json.loads((chat_run / "results.json").read_text())
  assert result["objective"] == "sft" and 0 <= result["accuracy"] <= 1 and result["tokens"] > 0
  assert np.isfinite(result["loss"])
  assert (chat_run / "chat_template.jinja").is_file() and (chat_run / "tokenizer.model").is_file()


def test_generate_chat_answers_and_its_export_answers_the_same_in_transformers(chat_run,
                                                                               tmp_path):
  """launch.generate --chat, a turn per line of stdin (--chat --prompt: tests/test_serve.py),
  replies as ChatSession does in this process, and the export in transformers alike."""
  import torch
  import transformers
  from lmjax.convert import export_hf
  from lmjax.inference.chat import ChatSession
  from lmjax.inference.generate import SamplingConfig
  question = "Who is there?"
  out = launch("launch.generate", f"--workdir={chat_run}", "--chat", "--temperature=0",
               "--max_new_tokens=12", stdin=f"{question}\nSay more.\n").stdout
  source = pretrained.load(str(chat_run))
  session = ChatSession(source)
  messages = [{"role": "user", "content": question}]
  ours = list(session.reply(messages, SamplingConfig(max_new_tokens=12, temperature=0.0)))
  assert ours and out.startswith(f"> {session.tokenizer.decode(ours)}\n> ")
  assert out.count("> ") == 3  # two turns, then end of input

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


def test_lm_eval_with_the_chat_template(chat_run):
  out = launch("launch.lm_eval", f"--workdir={chat_run}", "--tasks=lmjax_gen",
               "--include_path=tests/lm_eval_tasks", "--limit=2", "--apply_chat_template",
               "--log_samples", "--output=chat_eval.json")
  result = json.loads((chat_run / "chat_eval.json").read_text())
  prompt = result["samples"]["lmjax_gen"][0]["arguments"][0][0]  # (context, generation kwargs)
  assert prompt.startswith("<s><|user|>\n") and prompt.endswith("<|assistant|>\n")
  assert "lmjax_gen" in out.stdout


def _lines(workdir, split="train"):
  path = workdir / "metrics.jsonl"
  records = map(json.loads, open(path)) if path.exists() else []
  return [r for r in records if r["split"] == split]


def _wait_for_lines(proc, workdir, n):
  """Until the run `proc` has logged `n` training steps in `workdir` (or ended)."""
  deadline = time.monotonic() + 300
  path = workdir / "metrics.jsonl"
  # (a line being written is not yet one)
  while sum(json.loads(line)["split"] == "train"
            for line in (path.read_text().split("\n")[:-1] if path.exists() else [])) < n:
    assert time.monotonic() < deadline and proc.poll() is None
    time.sleep(0.05)


def _assert_close(a, b):
  for key in a:
    if isinstance(a[key], float):
      assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-5), key


@pytest.fixture(scope="module")
def dpo_run(chat_run, tmp_path_factory):
  """An uninterrupted one-device DPO run from chat_run, made in this process: the reference
  of the eight-device run and of the run killed with -9."""
  tmp = tmp_path_factory.mktemp("dpo")
  _in_process("dpo_tiny", chat_run, tmp / "straight", tmp)
  return tmp / "straight"


MESH = ["--cpu_devices=8", "--config.mesh.data=2", "--config.mesh.fsdp=4"]
MESH_LINE = "8 device(s), mesh {'data': 2, 'fsdp': 4, 'expert': 1, 'tensor': 1}"


def test_eight_devices_with_fsdp_equal_one_device(tiny_runs, chat_run, tmp_path):
  """SFT; DPO's eight devices: the SIGTERM test below."""
  eight = _run("chat_tiny", tiny_runs / "clm_tiny", tmp_path / "eight", tmp_path, *MESH,
               *STEP_FLAGS)
  assert MESH_LINE in eight.stderr
  np.testing.assert_allclose([r["loss"] for r in _lines(tmp_path / "eight")],
                             [r["loss"] for r in _lines(chat_run)], rtol=1e-4)
  _assert_close(*(json.loads((d / "results.json").read_text())
                  for d in (chat_run, tmp_path / "eight")))


def test_eight_dpo_devices_equal_one_and_sigterm_saves_the_current_step(chat_run, dpo_run,
                                                                        tmp_path):
  """DPO on eight devices with FSDP steps and evaluates as on one (its first 8 steps: the
  schedule is constant, so the run's length does not change them), then SIGTERM saves the
  step it is at and the run exits 0. SIGTERM is the training loop's `Preemption` hook, the
  same for every objective and device count (SFT's loop included; tests/test_finetune_loop.py
  and tests/test_launch.py send it to a classification and a pretraining run); sent here to
  DPO, whose run first scores its data with the reference model."""
  workdir = tmp_path / "eight"
  with open(tmp_path / "stderr", "w+") as err:
    proc = _run("dpo_tiny", chat_run, workdir, tmp_path, *MESH, "--config.train.steps=400",
                "--config.train.checkpoint_every=1000", popen=True, stderr=err)
    try:
      _wait_for_lines(proc, workdir, 8)
      proc.send_signal(signal.SIGTERM)
      assert proc.wait(timeout=120) == 0
    finally:
      if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
    err.seek(0)
    log = err.read()
  assert MESH_LINE in log and "preempted" in log, log[-3000:]
  np.testing.assert_allclose([r["loss"] for r in _lines(workdir)[:8]],
                             [r["loss"] for r in _lines(dpo_run)], rtol=1e-4)
  _assert_close(*(next(r for r in _lines(d, "eval") if r["step"] == 8)
                  for d in (dpo_run, workdir)))
  assert len(os.listdir(workdir / "checkpoints")) == 1  # checkpoint_every=1000: SIGTERM's


def test_kill_9_then_rerun_equals_an_uninterrupted_run(chat_run, dpo_run, tmp_path):
  """DPO (its reference scored first) killed with SIGKILL at a random moment after a step,
  then rerun: bitwise the uninterrupted run. kill -9 more times and during saves:
  tests/test_kill.py; an SFT run of chat_tiny resumed bitwise: tests/test_lora.py's
  test_resume_is_bitwise_and_refuses_another_base (the loop's resume is the same for every
  objective; SFT's batches are a function of the step)."""
  import random
  killed = tmp_path / "killed"
  proc = _run("dpo_tiny", chat_run, killed, tmp_path, "--cpu_devices=1", *STEP_FLAGS, popen=True,
              stderr=subprocess.DEVNULL)
  _wait_for_lines(proc, killed, 1)
  time.sleep(random.Random(0).uniform(0.0, 1.0))
  if proc.poll() is None:
    os.killpg(proc.pid, signal.SIGKILL)
  proc.wait(timeout=60)
  _run("dpo_tiny", chat_run, killed, tmp_path, "--cpu_devices=1", *STEP_FLAGS)
  assert_same_checkpoint(dpo_run, killed, 8)
  assert (json.loads((killed / "results.json").read_text()) ==
          json.loads((dpo_run / "results.json").read_text()))


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
