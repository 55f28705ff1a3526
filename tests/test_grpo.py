"""GRPO (`objective.kind=grpo`) on the training loop: rewards as plug-ins, rollouts from the
serving engine with the current weights, exact resume (also between two steps on one batch
of rollouts), SIGTERM saves, 8 simulated devices equal one, bad input in one line."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from tiny import ROOT, assert_same_checkpoint, finetune
from lmjax.errors import UserError
from lmjax.experiment import default_config
from lmjax.objectives import Completion, register_reward, rewards

WORDS = ["yes", "no", "king", "queen", "love", "death", "night", "day"]
# A reward that varies between random replies (so advantages are not all 0): the reply has an e.
HAS_E = r"(?s).*e.*"


def _prompts(path, n=16):
  records = [{"prompt": f"Say {WORDS[i % 8]}.", "answer": WORDS[i % 8]} for i in range(n)]
  if n:
    records[1] = {"messages": [{"role": "user", "content": "Say no."}], "answer": "no"}
  path.write_text("".join(json.dumps(r) + "\n" for r in records))
  return str(path)


def _config(tmp_path, **objective):
  path = _prompts(tmp_path / "prompts.jsonl")
  c = default_config("grpo")
  c["task"].update(train_file=path, eval_file=path)
  c["objective"].update(num_generations=4, max_completion_tokens=6, temperature=1.0,
                        rewards=("exact_match", "format", "length"), format_regex=HAS_E,
                        reward_weights=(1.0, 1.0, 0.1), **objective)
  c["data"].update(seq_len=48, cache_dir=str(tmp_path / "cache"))
  c["model"]["dropout_rate"] = 0.0
  c["optimizer"].update(learning_rate=3e-3, warmup_steps=1, schedule="constant")
  c["train"].update(steps=4, batch_size=8, log_every=1, eval_every=4, eval_batches=0,
                    checkpoint_every=1)
  return c


def _train_lines(workdir):
  return [r for r in map(json.loads, open(os.path.join(workdir, "metrics.jsonl")))
          if r["split"] == "train"]


# ----------------------------------------------------------------------------- rewards


def test_lmjax_rewards_score_as_documented():
  options = {"answer_field": "answer", "format_regex": r"\d+", "max_completion_tokens": 10,
             "overlong_cache": 4}
  fns = {n: rewards.reward_function(n, options) for n in ("exact_match", "format", "length",
                                                           "overlong")}
  replies = [Completion.of(" 42 ", [1, 2], True), Completion.of("forty-two", list(range(8)), False)]
  got = rewards.score(fns, ["q", "q"], replies, [{"answer": "42"}] * 2, ["f:1", "f:2"])
  np.testing.assert_allclose(got, [[1, 1, -0.2, 0], [0, 0, -0.8, -0.5]])


def test_a_reward_that_raises_or_returns_nan_names_the_record():
  @register_reward("test_fragile")
  def fragile(prompt, completion, record):
    return math.nan if record["x"] else 1 / 0
  fns = {"test_fragile": rewards.reward_function("test_fragile", {})}
  with pytest.raises(UserError, match=r"^p.jsonl:3: reward test_fragile raised ZeroDivisionError"):
    rewards.score(fns, ["q"], [Completion.of("a", [1], True)], [{"x": 0}], ["p.jsonl:3"])
  with pytest.raises(UserError, match=r"^p.jsonl:4: reward test_fragile returned nan"):
    rewards.score(fns, ["q"], [Completion.of("a", [1], True)], [{"x": 1}], ["p.jsonl:4"])
  with pytest.raises(UserError, match="'nope' is not a registered reward"):
    rewards.reward_function("nope", {})
  with pytest.raises(ValueError, match="lmjax's own"):
    register_reward("exact_match")(fragile)


def test_several_hosts_are_refused_in_one_line(monkeypatch):
  import jax
  from lmjax import rollouts
  monkeypatch.setattr(jax, "process_count", lambda: 2)
  with pytest.raises(UserError, match="^objective grpo runs in one process"):
    rollouts.datasets(None, 48, None, None, 0)


# ----------------------------------------------------------------------------- runs


@pytest.fixture(scope="module")
def straight(tiny_runs, tmp_path_factory):
  """(folder, config, results) of an uninterrupted 4-step run made in this process, two
  steps on each batch of rollouts, with a KL term: the reference of the resumed run, of
  the eight-device run and of the run killed with -9."""
  tmp = tmp_path_factory.mktemp("grpo")
  c = _config(tmp, num_iterations=2, beta=0.04)
  return tmp / "straight", c, finetune(c, tiny_runs / "clm_tiny", tmp / "straight")


def test_grpo_trains_logs_and_resumes_bitwise_between_steps_on_one_rollout(tiny_runs, straight,
                                                                          tmp_path):
  folder, c, results = straight
  init = tiny_runs / "clm_tiny"
  # Stopped inside rollout 1 (steps 3-4); the schedule is constant, so the first 3 steps are
  # the same as the straight run's.
  stopped = {**c, "train": {**c["train"], "steps": 3}}
  finetune(stopped, init, tmp_path / "resumed")
  assert os.listdir(tmp_path / "resumed" / "rollouts") == ["1.0.npz"]
  resumed = finetune(c, init, tmp_path / "resumed")
  assert_same_checkpoint(folder, tmp_path / "resumed", 4)
  assert resumed == results
  lines = _train_lines(folder)
  for key in ("reward", "reward_std", "reward_exact_match", "reward_format_std", "kl", "entropy",
              "clip_fraction", "completion_length", "zero_std_groups", "rollout_seconds",
              "update_seconds"):
    assert all(np.isfinite(r[key]) for r in lines), key
  assert any(r["grad_norm"] > 0 for r in lines)  # the rewards differ within groups
  assert lines[1]["rollout_seconds"] == 0 < lines[0]["rollout_seconds"]  # step 2 reuses 1's
  assert lines[0]["kl"] == 0 < lines[3]["kl"]  # the policy left the reference
  assert {"reward_exact_match", "reward_length", "completion_length"} <= set(results)


def test_grpo_with_lora_takes_the_base_with_adapters_off_as_reference(tiny_runs, tmp_path):
  import flax.linen as nn
  import jax
  from lmjax import lora
  from lmjax.checkpoint import Checkpointer
  from lmjax.experiment import experiment_from_dict
  from lmjax.run import build_run, default_hooks, train_loop
  name_of = lambda path: jax.tree_util.keystr(path, simple=True, separator="/")
  runs = {}
  for name, enabled in (("plain", False), ("lora", True)):
    c = _config(tmp_path, beta=0.04)
    c["optimizer"]["warmup_steps"] = 0  # step 1 moves the adapters: step 2 has a KL
    c["train"].update(steps=2, checkpoint_every=2, eval_every=0,
                      init_from=str(tiny_runs / "clm_tiny"))
    c["lora"].update(enabled=enabled, rank=4, targets=["attention_mlp"])
    runs[name] = build_run(experiment_from_dict(c), str(tmp_path / name))
  plain, adapted = runs["plain"], runs["lora"]
  plain.ckpt.close()
  plain.writer.close()
  # A policy away from its base: the engine samples with the adapters, the KL's reference
  # leaves them out (the same rollouts as a run without LoRA on the merged weights).
  keys = iter(jax.random.split(jax.random.PRNGKey(0), 64))
  policy = jax.tree_util.tree_map_with_path(
      lambda p, x: x + 0.2 * jax.random.normal(next(keys), x.shape, x.dtype)
      if lora.is_adapter(name_of(p)) else x, adapted.init_params)
  adapted.train_data.bind(policy)
  plain.train_data.bind(lora.merged(jax.device_get(policy), adapted.exp.lora.scale))
  got, want = adapted.train_data.batch(5, 8), plain.train_data.batch(5, 8)  # not a step run below
  np.testing.assert_array_equal(got["tokens"], want["tokens"])
  assert np.any(got["completion_mask"]) and np.any(got["ref_logps"] != 0)
  np.testing.assert_allclose(got["ref_logps"], want["ref_logps"], rtol=0, atol=1e-6)
  assert not np.allclose(got["ref_logps"], adapted.fns.objective.next_token_logps(
      policy, got["tokens"], got["segment_ids"], got["positions"]), atol=1e-3)
  try:  # two steps: only the adapters train, and the policy leaves its base
    with jax.set_mesh(adapted.mesh), nn.logical_axis_rules(adapted.exp.mesh.rules):
      train_loop(adapted, default_hooks(adapted))
  finally:
    adapted.ckpt.close()
    adapted.writer.close()
  lines = _train_lines(tmp_path / "lora")
  assert lines[0]["kl"] == 0 < lines[1]["kl"]  # fresh adapters (B = 0): the policy is the base
  ckpt = Checkpointer(str(tmp_path / "lora"), read_only=True)
  try:
    saved = jax.tree_util.tree_leaves_with_path(ckpt.restore_arrays(2)["params"])
    assert saved and all(lora.is_adapter(name_of(p)) for p, _ in saved)
  finally:
    ckpt.close()


def test_eight_devices_equal_one_kill_9_resumes_bitwise_and_sigterm_saves(tiny_runs, straight,
                                                                          tmp_path):
  """The straight run (this process's, the run launch.finetune makes: tiny.finetune) against
  eight devices, then SIGTERMed (the schedule is constant: a longer run's first 4 steps are
  the same), and a run killed with -9 then rerun, through launch.finetune (kill -9 more
  times and during saves: tests/test_kill.py)."""
  import random
  one, c, _ = straight
  config = tmp_path / "grpo_config.py"
  config.write_text(f"def get_config(arg=''):\n  import ml_collections\n"
                    f"  return ml_collections.ConfigDict({c!r})\n")
  command = lambda name, *args: [
      sys.executable, "-m", "launch.finetune", f"--config={config}",
      f"--init_from={tiny_runs / 'clm_tiny'}", f"--workdir={tmp_path / name}", *args]
  workdir = tmp_path / "eight"
  with open(tmp_path / "stderr", "w+") as log:
    proc = subprocess.Popen(command("eight", "--cpu_devices=8", "--config.mesh.data=2",
                                    "--config.mesh.fsdp=4", "--config.train.steps=400",
                                    "--config.train.checkpoint_every=1000"),
                            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=log, text=True)
    try:
      _wait_for_lines(proc, workdir / "metrics.jsonl", 4)
      proc.send_signal(signal.SIGTERM)
      assert proc.wait(timeout=120) == 0
    finally:
      if proc.poll() is None:
        proc.kill()
    log.seek(0)
    err = log.read()
  assert "8 device(s)" in err and "preempted" in err, err[-3000:]
  steps = [int(n) for n in os.listdir(workdir / "checkpoints")]
  assert len(steps) == 1 and 4 <= steps[0] < 400
  a, b = _train_lines(one), _train_lines(workdir)[:4]
  for key in ("loss", "reward", "completion_length", "grad_norm"):
    np.testing.assert_allclose([r[key] for r in b], [r[key] for r in a], rtol=1e-4, atol=1e-6)
  killed = tmp_path / "killed"
  proc = subprocess.Popen(command("killed", "--cpu_devices=1"), cwd=ROOT,
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                          start_new_session=True)
  _wait_for_lines(proc, killed / "metrics.jsonl", 1)
  time.sleep(random.Random(1).uniform(0.0, 1.0))
  if proc.poll() is None:
    os.killpg(proc.pid, signal.SIGKILL)
  proc.wait(timeout=60)
  final = subprocess.run(command("killed", "--cpu_devices=1"), cwd=ROOT, capture_output=True,
                         text=True, timeout=600)
  assert final.returncode == 0, final.stderr[-3000:]
  assert_same_checkpoint(one, killed, 4)
  assert (killed / "results.json").read_text() == (one / "results.json").read_text()


def _steps_logged(metrics) -> int:
  """Training steps in the file `metrics` so far (a line being written is not yet one)."""
  lines = metrics.read_text().split("\n")[:-1] if metrics.exists() else []
  return sum(json.loads(line)["split"] == "train" for line in lines)


def _wait_for_lines(proc, metrics, n):
  """Until the run `proc` has logged `n` training steps to `metrics` (or ended)."""
  deadline = time.monotonic() + 300
  while _steps_logged(metrics) < n:
    assert time.monotonic() < deadline and proc.poll() is None
    time.sleep(0.05)


@pytest.mark.parametrize("change,message", [
    ({"objective": {"num_generations": 1}}, "objective.num_generations must be >= 2"),
    ({"objective": {"rewards": ("exact_match", "format", "nope")}}, "'nope' is not a registered reward"),
    ({"objective": {"loss_type": "ppo"}}, "objective.loss_type must be one of grpo, dapo"),
    ({"prompts": 0}, "task file is empty: .*prompts.jsonl"),
    ({"train": {"batch_size": 6}}, "train.batch_size=6 (replies per step, 6 per process) is not "
     "a multiple of objective.num_generations=4"),
])
def test_bad_input_is_one_line(tiny_runs, tmp_path, change, message):
  c = _config(tmp_path)
  if "prompts" in change:
    _prompts(tmp_path / "prompts.jsonl", 0)
  for section, values in change.items():
    if section != "prompts":
      c[section].update(values)
  with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)")
                     if "(" in message else message):
    finetune(c, tiny_runs / "clm_tiny", tmp_path / "run")


def test_bad_input_exits_2_with_one_line(tiny_runs, tmp_path):
  path = tmp_path / "p.jsonl"
  path.write_text(json.dumps({"question": "Say yes."}) + "\n")
  proc = subprocess.run(
      [sys.executable, "-m", "launch.finetune", "--config=experiments/grpo_tiny.py",
       f"--init_from={tiny_runs / 'clm_tiny'}", f"--workdir={tmp_path / 'run'}",
       f"--config.task.train_file={path}", f"--config.task.eval_file={path}"],
      cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 2
  assert proc.stderr.strip().splitlines()[-1] == (
      f"error: {path}:1: expected 'prompt' (text or messages) or 'messages'")


@pytest.mark.parametrize("arg,kind,data", [
    ("", "grpo", "grpo_speakers"), ("passages", "grpo", "grpo"), ("warmup", "sft", None),
    ("speakers", "grpo", "grpo_speakers"), ("speakers_warmup", "sft", None)])
def test_grpo_tiny_variants_parse(arg, kind, data):
  """The default is the task that meets the exact-match target (after `:warmup`);
  `:speakers` and `:speakers_warmup`, its earlier names, still load."""
  import importlib
  from lmjax.experiment import experiment_from_dict
  module = importlib.import_module("experiments.grpo_tiny")
  exp = experiment_from_dict(module.get_config(arg).to_dict())
  assert exp.objective.kind == kind
  assert os.path.isfile(exp.task.train_file) and os.path.isfile(exp.task.eval_file)
  if data:
    assert os.path.basename(exp.task.train_file) == f"{data}_train.jsonl"
  with pytest.raises(ValueError, match="unknown variant"):
    module.get_config("passage")


def test_benchmark_runs_tiny(tmp_path):
  out = tmp_path / "grpo.json"
  proc = subprocess.run([sys.executable, "-m", "benchmarks.grpo", "--tiny", f"--json={out}"],
                        cwd=ROOT, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  got = json.loads(out.read_text())
  assert 0 < got["rollout_tokens"] <= 4 * 12  # 2 prompts x 2 replies, up to 12 tokens each
  assert 0 < got["generation_share"] < 1
  assert got["update_share"] == pytest.approx(1 - got["generation_share"])
  for key in ("rollout_tokens_per_s", "served_tokens_per_s", "grpo_step_vs_sft"):
    assert got[key] > 0, key


def test_benchmark_measures_a_run_s_held_out_rewards(straight):
  """`benchmarks.grpo --held_out RUN`: the run's greedy replies to grpo_tiny's held-out
  prompts (its default task), scored as a GRPO run's evaluation scores them."""
  proc = subprocess.run([sys.executable, "-m", "benchmarks.grpo", f"--held_out={straight[0]}"],
                        cwd=ROOT, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  got = json.loads(proc.stdout.strip().splitlines()[-1])
  assert got["run"] == str(straight[0])
  for name in ("exact_match", "speaker_similarity", "format"):
    assert 0 <= got[f"reward_{name}"] <= 1, got
