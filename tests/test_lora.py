"""LoRA: adapters on a frozen base, only adapters train, checkpoints hold adapters and the
base's identity, resumes are bitwise and refuse another base, a LoRA run loads merged."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hf_models import make_hf_model
from lmjax import lora, pretrained
from lmjax.checkpoint import Checkpointer
from lmjax.errors import UserError
from lmjax.experiment import experiment_from_dict
from tiny import ROOT, assert_same_checkpoint, finetune, tiny_config, tree_digest


def lora_config(tmp, steps=4, **overrides):
  c = tiny_config("chat_tiny", tmp, train__steps=steps, train__checkpoint_every=2,
                  data__seq_len=64, optimizer__learning_rate=0.02, optimizer__warmup_steps=0,
                  **overrides)
  c.lora.update(enabled=True, rank=4, alpha=8.0, targets=("attention_mlp",))
  return c.to_dict()


@pytest.fixture(scope="module")
def base(tmp_path_factory):
  tmp = tmp_path_factory.mktemp("lora")
  make_hf_model("llama", str(tmp / "llama"))
  finetune(lora_config(tmp), tmp / "llama", tmp / "run")
  return tmp


def _flat(tree):
  return {pretrained.param_name(k): v for k, v in jax.tree_util.tree_leaves_with_path(tree)}


def test_checkpoint_holds_adapters_optimizer_state_and_base_identity(base):
  ckpt = Checkpointer(str(base / "run"), read_only=True)
  try:
    state, meta = ckpt.restore_arrays(4), ckpt.read_meta(4)
  finally:
    ckpt.close()
  names = sorted(_flat(state["params"]))
  assert names and all(n.endswith(("/lora_a", "/lora_b")) for n in names)
  layers = {n.rsplit("/", 1)[0].split("/")[-1] for n in names}
  assert layers == {"query", "key", "value", "out", "gate", "up", "wo"}
  moments = [v for k, v in _flat(state["opt_state"]).items() if v.ndim > 0]
  assert len(moments) == 2 * len(names)  # Adam's two moments, adapters only
  source = pretrained.load(str(base / "llama"))
  assert meta["lora_base"]["sha256"] == lora.checksum(source.params)
  assert meta["lora_base"]["path"] == str(base / "llama")


def _parts(base):
  return _parts_of(base, lora_config(base))


def _qa_config(tmp):
  """qa_tiny (SQuAD-style spans over windows, a new QA head) with adapters."""
  c = tiny_config("qa_tiny", tmp, train__steps=2, data__seq_len=64,
                  optimizer__learning_rate=0.02, optimizer__warmup_steps=0)
  c.lora.update(enabled=True, rank=4, alpha=8.0, targets=("attention_mlp",))
  return c.to_dict()


def test_only_adapters_change_and_step_zero_is_the_base(base):
  """Only the adapters train (and QA's new span head, in full, as classification's); the
  base is bitwise unchanged and has no optimizer state. QA makes every check an SFT run
  would (its decoder's adapters, step zero the base) and the new head's besides; an SFT run
  saves adapters and their Adam moments only: test_checkpoint_holds_adapters_..."""
  from lmjax.loop import _fresh
  from lmjax.sharding import logical_to_shardings
  from lmjax.steps import eval_step, init_state, train_step
  parts = _parts_of(base, _qa_config(base))
  fns = parts.fns
  abstract = jax.eval_shape(lambda: init_state(fns, 0, (1, 64)))
  with jax.set_mesh(parts.mesh):
    state = _fresh(parts, logical_to_shardings(abstract, parts.mesh, parts.exp.mesh.rules))
  before = jax.tree.map(np.asarray, state.params)
  batch = jax.tree.map(jnp.asarray, parts.train_data.batch(0, 8, 0, 1))
  rng = jax.random.PRNGKey(0)
  with_adapters = eval_step(fns, state.params, batch, rng)
  bare = eval_step(fns, lora.without_adapters(state.params), batch, rng)
  jax.tree.map(np.testing.assert_array_equal, with_adapters, bare)  # B = 0: the base, exactly
  step = jax.jit(lambda s, b: train_step(fns, s, b))
  for i in range(3):
    state, _ = step(state, jax.tree.map(jnp.asarray, parts.train_data.batch(i, 8, 0, 1)))
  after = _flat(jax.tree.map(np.asarray, state.params))
  heads = [n for n in after if fns.objective.is_new_param(n)]
  assert heads
  for name, value in _flat(before).items():
    if lora.is_adapter(name) or name in heads:
      assert name.endswith("lora_a") or not np.array_equal(value, after[name]), name
    else:
      np.testing.assert_array_equal(value, after[name], err_msg=name)
  trained = [n for n in after if lora.is_adapter(n) or n in heads]
  moments = [v for v in jax.tree.leaves(state.opt_state) if v.ndim > 0]
  assert len(moments) == 2 * len(trained)  # no optimizer state for the base


def test_resume_is_bitwise_and_refuses_another_base(base, tmp_path):
  shutil.copytree(base / "run", tmp_path / "split")
  shutil.rmtree(tmp_path / "split" / "checkpoints" / "4")  # as if stopped after step 2
  finetune(lora_config(base, steps=4), base / "llama", tmp_path / "split")
  assert_same_checkpoint(base / "run", tmp_path / "split", 4)
  other = tmp_path / "other"
  shutil.copytree(base / "llama", other)
  from lmjax.convert.weights import read_file
  from safetensors.numpy import save_file
  tensors = {k: np.array(v) for k, v in read_file(str(other / "model.safetensors")).items()}
  name = next(k for k in tensors if k.endswith("q_proj.weight"))
  tensors[name][0, 0] += 1.0
  save_file(tensors, str(other / "model.safetensors"), metadata={"format": "pt"})
  with pytest.raises(UserError, match="adapters trained on another base"):
    finetune(lora_config(base, steps=6), other, tmp_path / "split")


def test_a_lora_run_loads_merged(base, adapted):
  """generate, serve, evaluate and convert read a LoRA run as one model: its base with
  the adapters merged, computing what the adapted model computes."""
  from lmjax.model import build_model
  merged = pretrained.load(str(base / "run"))
  tokens, ours, bare = adapted
  plain = np.asarray(build_model(merged.model, True).apply(
      {"params": merged.params}, jnp.asarray(tokens), jnp.ones_like(jnp.asarray(tokens))))
  np.testing.assert_allclose(plain, ours, atol=1e-5)
  assert not np.array_equal(plain, bare)  # the adapters did change it


@pytest.mark.parametrize("change, message", [
    ({"targets": ("attention/nonesuch",)}, "matches no dense layer .layers: transformer/"),
    ({"rank": 0}, "lora.rank must be >= 1, got 0"),
    ({"rank": 1000}, "lora.rank=1000 exceeds the width"),
    ({"base_dtype": "int4"}, "lora.base_dtype must be one of"),
])
def test_bad_lora_settings_are_one_line(base, change, message):
  config = lora_config(base)
  config["lora"].update(change)
  with pytest.raises(UserError, match=message):
    _parts_of(base, config)


def _parts_of(base, config):
  from lmjax.run import assemble
  config["train"]["init_from"] = str(base / "llama")
  return assemble(experiment_from_dict(config), None)


def test_clm_with_lora_through_launch_train_survives_kill_9(base, tmp_path):
  """Continued pretraining of an lmjax run with adapters, from the command line, killed with
  SIGKILL mid-run and rerun: it ends bitwise equal to an uninterrupted run (adapters and
  optimizer state) and the base run is untouched."""
  import os
  import signal
  import time
  from lmjax.run import train_and_evaluate
  cfg = tiny_config("clm_tiny", tmp_path, train__steps=2, train__checkpoint_every=2)
  train_and_evaluate(experiment_from_dict(cfg.to_dict()), str(tmp_path / "clm"))
  digest = tree_digest(tmp_path / "clm")
  changes = {**_tiny_flags(), "train.init_from": str(tmp_path / "clm"), "lora.enabled": True,
             "lora.rank": 2, "train.steps": KILL_STEPS, "train.checkpoint_every": 2}
  straight = tiny_config("clm_tiny", tmp_path, **{k.replace(".", "__"): v
                                                   for k, v in changes.items()})
  train_and_evaluate(experiment_from_dict(straight.to_dict()), str(tmp_path / "straight"))
  killed = tmp_path / "clm_lora"
  command = [sys.executable, "-m", "launch.train", "--config=experiments/clm_tiny.py",
             f"--workdir={killed}", f"--config.data.cache_dir={tmp_path / 'cache'}",
             *[f"--config.{k}={v}" for k, v in changes.items()]]
  proc = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL, start_new_session=True)
  deadline = time.monotonic() + 300
  while not (killed / "checkpoints" / "2").exists():  # killed with a step saved, mid-run
    assert time.monotonic() < deadline and proc.poll() is None
    time.sleep(0.02)
  os.killpg(proc.pid, signal.SIGKILL)
  proc.wait(timeout=60)
  assert not (killed / "results.json").exists()
  # The rerun, in this process: the experiment the same command builds (launch.train's
  # own resume after kill -9: tests/test_kill.py).
  train_and_evaluate(experiment_from_dict(straight.to_dict()), str(killed))
  assert_same_checkpoint(tmp_path / "straight", killed, KILL_STEPS)
  meta = Checkpointer(str(killed), read_only=True).read_meta(KILL_STEPS)
  assert meta["lora_base"]["path"] == str(tmp_path / "clm")
  assert (json.loads((killed / "results.json").read_text()) ==
          json.loads((tmp_path / "straight" / "results.json").read_text()))
  assert tree_digest(tmp_path / "clm") == digest


KILL_STEPS = 16


def _tiny_flags():
  from tiny import TINY_OVERRIDES
  return {k: v for k, v in TINY_OVERRIDES.items() if k != "train.checkpoint_every"}


def _adapter(base):
  out = base / "adapter"
  if not out.exists():
    proc = subprocess.run([sys.executable, "-m", "launch.convert", f"--input={base / 'run'}",
                           f"--output={out}", "--adapter_only"], cwd=ROOT, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
  return out


@pytest.fixture(scope="module")
def adapted(base):
  """(tokens, the LoRA run's logits: its base with its adapters, the base's alone), as the
  run's model computes them; once for the PEFT and the merged export tests."""
  parts = _parts(base)
  ckpt = Checkpointer(str(base / "run"), read_only=True)
  try:
    adapters = ckpt.restore_arrays(4)["params"]
  finally:
    ckpt.close()
  source = pretrained.load(str(base / "llama"))
  tokens = np.arange(3, 35)[None] % 200
  logits = lambda params: np.asarray(parts.fns.eval_model.apply(
      {"params": params}, jnp.asarray(tokens), jnp.ones_like(jnp.asarray(tokens))))
  return tokens, logits(lora.combine(source.params, adapters)), logits(source.params)


def test_peft_loads_the_adapter_export_with_lmjax_logits(base, adapted):
  import peft
  import torch
  from hf_models import load_causal_lm
  out = _adapter(base)
  config = json.loads((out / "adapter_config.json").read_text())
  assert (config["peft_type"], config["r"], config["lora_alpha"]) == ("LORA", 4, 8.0)
  model = peft.PeftModel.from_pretrained(load_causal_lm(str(base / "llama")), str(out))
  model.eval()
  tokens, ours, bare = adapted
  with torch.no_grad():
    theirs = model(torch.tensor(tokens)).logits.numpy()
  assert np.abs(ours - bare).max() > 1e-3  # the adapters matter
  np.testing.assert_allclose(theirs, ours, atol=1e-4)


def test_a_peft_adapter_starts_a_run_and_loads_with_a_base(base):
  out = _adapter(base)
  config = lora_config(base)
  config["lora"] = {"init_from": str(out)}  # rank, alpha and layers come from the adapter
  parts = _parts_of(base, config)
  assert (parts.exp.lora.rank, parts.exp.lora.alpha) == (4, 8.0)
  ckpt = Checkpointer(str(base / "run"), read_only=True)
  try:
    trained = _flat(ckpt.restore_arrays(4)["params"])
  finally:
    ckpt.close()
  loaded = {k: v for k, v in _flat(parts.init_params).items() if lora.is_adapter(k)}
  assert sorted(loaded) == sorted(trained)
  for name, value in trained.items():
    np.testing.assert_array_equal(np.asarray(loaded[name]), value, err_msg=name)
  with_adapter = pretrained.load(str(base / "llama"), adapter=str(out))
  merged = pretrained.load(str(base / "run"))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6),
               with_adapter.params, merged.params)


def test_generate_serve_evaluate_and_lm_eval_take_a_base_and_an_adapter(base, tmp_path):
  """The four launchers with `--workdir BASE --adapter DIR` (run at once) compute what the
  LoRA run they were exported from computes, loaded merged in process."""
  import os
  import signal
  import openai
  from lmjax import harness
  from lmjax.data import BUNDLED_DIR
  from lmjax.evaluation import evaluate_files
  from lmjax.inference import generation_config
  from lmjax.inference.generate import Generator, SamplingConfig
  from lmjax.inference.serve_process import spawn
  llama, adapter, prompt = str(base / "llama"), f"--adapter={_adapter(base)}", "First Citizen:"
  valid = os.path.join(BUNDLED_DIR, "valid.txt")
  tasks = os.path.join(ROOT, "tests", "lm_eval_tasks")
  start = lambda module, *args: subprocess.Popen(
      [sys.executable, "-m", module, f"--workdir={llama}", adapter, *args], cwd=ROOT,
      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  procs = [start("launch.generate", f"--prompt={prompt}", "--temperature=0",
                 "--max_new_tokens=12"),
           start("launch.evaluate", f"--data={valid}", "--seq_len=32", "--max_batches=1",
                 f"--output={tmp_path / 'evaluation.json'}"),
           start("launch.lm_eval", "--tasks=lmjax_ppl", f"--include_path={tasks}", "--limit=4",
                 f"--output={tmp_path / 'lm_eval.json'}")]
  with open(tmp_path / "serve.log", "w") as log:
    server, url = spawn(llama, adapter, "--max_batch=2", log=log)
    try:
      client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=120)
      served = client.completions.create(model="llama", prompt=prompt, max_tokens=12,
                                         temperature=0).choices[0].text
    finally:
      os.killpg(server.pid, signal.SIGTERM)
      assert server.wait(60) == 0
  generated, evaluated, lm_evaluated = (p.communicate(timeout=600) for p in procs)
  for p, (_, err) in zip(procs, (generated, evaluated, lm_evaluated)):
    assert p.returncode == 0, err[-3000:]
  merged = pretrained.load(str(base / "run"))  # the run's base with its adapters merged
  tok = merged.tokenizer
  eos = generation_config.for_model(merged).eos_ids
  ids = Generator(merged.model, merged.params, eos=eos, pad=max(tok.special.pad, 0)).generate(
      [[tok.special.bos] * (tok.special.bos >= 0) + tok.encode([prompt])[0]],
      SamplingConfig(12, temperature=0.0))[0]
  assert generated[0] == prompt + tok.decode(ids) + "\n" and served == tok.decode(ids)
  want = evaluate_files(merged, [valid], 32, 8, 1)
  bare = evaluate_files(pretrained.load(llama), [valid], 32, 8, 1)
  assert abs(want["loss"] - bare["loss"]) > 1e-4  # the adapter matters
  assert json.loads(evaluated[0])["loss"] == pytest.approx(want["loss"], rel=1e-5)
  theirs = json.loads((tmp_path / "lm_eval.json").read_text())["results"]["lmjax_ppl"]
  ours = harness.run(merged, ["lmjax_ppl"], limit=4, include_path=tasks)["results"]["lmjax_ppl"]
  assert theirs["word_perplexity,none"] == pytest.approx(ours["word_perplexity,none"], rel=1e-5)


@pytest.mark.parametrize("change, message", [
    ({"peft_type": "IA3"}, "holds a IA3 adapter; lmjax reads LoRA adapters only"),
    ({"use_dora": True}, "use_dora=True is not supported"),
])
def test_a_peft_config_lmjax_cannot_honour_is_one_line(base, tmp_path, change, message):
  out = tmp_path / "adapter"
  shutil.copytree(_adapter(base), out)
  config = json.loads((out / "adapter_config.json").read_text())
  (out / "adapter_config.json").write_text(json.dumps({**config, **change}))
  with pytest.raises(UserError, match=message):
    pretrained.load(str(base / "llama"), adapter=str(out))


def test_merged_export_loads_in_transformers_without_adapter_code(base, adapted, tmp_path):
  import torch
  from hf_models import load_causal_lm
  from lmjax.convert import export_hf
  # launch.convert's export of a run, in this process: the LoRA run loads merged (the
  # command itself: tests/test_lm_eval.py, tests/test_use_models.py; --adapter_only: _adapter)
  export_hf(pretrained.load(str(base / "run")), str(tmp_path / "merged"))
  tokens, ours, _ = adapted
  with torch.no_grad():
    theirs = load_causal_lm(str(tmp_path / "merged"))(torch.tensor(tokens)).logits.numpy()
  np.testing.assert_allclose(theirs, ours, atol=1e-4)


def test_dpo_with_lora_takes_the_base_with_adapters_off_as_reference(base, tmp_path):
  import flax.linen as nn
  from lmjax.run import build_run, default_hooks, train_loop
  from hf_models import make_family_model
  make_family_model("llama3", str(tmp_path / "llama"))  # 512 positions: DPO's pairs fit
  refs = {}
  for name, enabled in (("plain", False), ("lora", True)):
    config = tiny_config("dpo_tiny", tmp_path, train__steps=2, data__seq_len=160,
                         train__checkpoint_every=2).to_dict()
    config["train"]["init_from"] = str(tmp_path / "llama")
    config["lora"].update(enabled=enabled, rank=4, targets=["attention_mlp"])
    run = build_run(experiment_from_dict(config), str(tmp_path / name))
    if not enabled:
      run.ckpt.close()
      run.writer.close()
    refs[name] = {k: run.train_data.arrays[k] for k in ("ref_chosen", "ref_rejected")}
  try:  # the LoRA run built above trains, on the reference scores compared here
    assert refs["lora"]["ref_chosen"].size > 0
    jax.tree.map(np.testing.assert_array_equal, refs["plain"], refs["lora"])
    with jax.set_mesh(run.mesh), nn.logical_axis_rules(run.exp.mesh.rules):
      metrics = train_loop(run, default_hooks(run))
  finally:
    run.ckpt.close()
    run.writer.close()
  assert np.isfinite(metrics["loss"])
  ckpt = Checkpointer(str(tmp_path / "lora"), read_only=True)
  try:
    assert all(lora.is_adapter(n) for n in _flat(ckpt.restore_arrays(2)["params"]))
  finally:
    ckpt.close()


def test_an_adapter_for_another_base_or_family_is_one_line(base, tmp_path):
  from hf_models import make_family_model
  out = _adapter(base)
  make_family_model("qwen3", str(tmp_path / "qwen3"))  # 3 layers, q_proj 64 wide
  with pytest.raises(UserError, match="adapts a projection in some layers only"):
    pretrained.load(str(tmp_path / "qwen3"), adapter=str(out))
  make_hf_model("gpt2", str(tmp_path / "gpt2"))
  with pytest.raises(UserError, match="LLaMA-built families .* not gpt2"):
    pretrained.load(str(tmp_path / "gpt2"), adapter=str(out))


def test_launch_finetune_refuses_bad_lora_input_in_one_line(base, tmp_path):
  proc = subprocess.run(
      [sys.executable, "-m", "launch.finetune", "--config=experiments/chat_tiny.py",
       f"--init_from={base / 'llama'}", f"--workdir={tmp_path / 'run'}",
       "--config.lora.enabled=True", "--config.lora.targets=('attention', 'mlp/nonesuch')",
       "--config.data.seq_len=64"], cwd=ROOT, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 2, proc.stderr[-2000:]
  last = proc.stderr.strip().splitlines()[-1]
  assert last.startswith("error: lora.targets: 'mlp/nonesuch' matches no dense layer"), last
  assert not (tmp_path / "run" / "checkpoints").exists()


def test_an_adapter_that_does_not_fit_a_kernel_is_refused():
  a, b = np.zeros((2, 32, 4)), np.zeros((2, 4, 64))
  assert [x.shape for x in lora.fit((2, 32, 4, 16), a, b)] == [(2, 32, 4), (2, 4, 4, 16)]
  assert [x.shape for x in lora.fit((2, 4, 8, 64), a, b)] == [(2, 4, 8, 4), (2, 4, 64)]
  with pytest.raises(UserError, match="does not fit a kernel of shape"):
    lora.fit((2, 32, 2, 16), a, b)


def test_classification_with_lora_trains_its_new_head_in_full(tmp_path):
  make_hf_model("bert", str(tmp_path / "bert"))
  c = tiny_config("finetune_pairs", tmp_path, train__steps=2, train__checkpoint_every=2,
                  data__seq_len=32)
  c.lora.update(enabled=True, rank=2, targets=("attention",))
  finetune(c.to_dict(), tmp_path / "bert", tmp_path / "run")
  ckpt = Checkpointer(str(tmp_path / "run"), read_only=True)
  try:
    names = _flat(ckpt.restore_arrays(2)["params"])
  finally:
    ckpt.close()
  heads = [n for n in names if not lora.is_adapter(n)]
  assert heads and all(n.startswith("classifier") or "head" in n for n in heads), heads
  assert any(n.endswith("attention/query/lora_a") for n in names)


def test_adapter_scale_init_and_dropout():
  """rsLoRA's scale; A drawn as PEFT's kaiming-uniform, B zero; dropout only in training
  and only on the adapters' input."""
  from lmjax.model import TransformerConfig, build_model
  assert lora.LoraConfig(rank=16, alpha=32.0).scale == 2.0
  assert lora.LoraConfig(rank=16, alpha=32.0, rslora=True).scale == 8.0
  cfg = TransformerConfig(family="decoder", vocab_size=64, max_len=16, d_model=32,
                          num_layers=2, num_heads=2, d_ff=64, position="rope", norm="rmsnorm",
                          mlp="swiglu", activation="silu", use_bias=False)
  module = build_model(cfg, True)
  spec = lora.make_spec(lora.LoraConfig(enabled=True, rank=4, dropout=0.5,
                                        targets=("attention",)), module, 16, lambda n: False)
  assert sorted(k.rsplit("/", 1)[-1] for k in spec.targets) == ["key", "out", "query", "value"]
  tokens = jnp.arange(16)[None] % 64
  params = module.init(jax.random.PRNGKey(0), tokens, jnp.ones_like(tokens))["params"]
  params = spec.prepare(lora.adapters.select(params, lambda n: True), jax.random.PRNGKey(1))
  from lmjax.sharding import unbox
  params = unbox(params)
  query = params["transformer"]["stack"]["layers"]["attention"]["query"]
  bound = 1 / np.sqrt(32)
  assert query["lora_a"].shape == (2, 32, 4) and query["lora_b"].shape == (2, 4, 2, 16)
  assert np.abs(query["lora_a"]).max() <= bound and np.abs(query["lora_a"]).max() > 0.8 * bound
  assert not np.any(query["lora_b"])
  params = jax.tree.map(lambda x: x, params)
  for name in ("query", "key", "value", "out"):  # nonzero B: the adapters now act
    node = params["transformer"]["stack"]["layers"]["attention"][name]
    node["lora_b"] = jnp.ones_like(node["lora_b"]) * 0.1
  run = lambda model, seed: np.asarray(model.apply({"params": params}, tokens,
                                                   jnp.ones_like(tokens),
                                                   rngs={"dropout": jax.random.PRNGKey(seed)}))
  train, evaluate = spec.wrap(module, True), spec.wrap(module, False)
  assert not np.array_equal(run(train, 0), run(train, 1))  # dropout draws differ
  np.testing.assert_array_equal(run(evaluate, 0), run(evaluate, 1))
  bare = np.asarray(module.apply({"params": lora.without_adapters(params)}, tokens,
                                 jnp.ones_like(tokens)))
  assert not np.allclose(run(evaluate, 0), bare, atol=1e-3)


def test_lora_benchmark_runs_tiny(tmp_path):
  out = tmp_path / "lora.json"
  proc = subprocess.run([sys.executable, "-m", "benchmarks.lora", "--shapes=tiny",
                         "--time_shapes=tiny", "--time_layers=1,3", "--seq_len=32",
                         "--batch=2", "--repeats=1",
                         f"--json={out}"], cwd=ROOT, capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0, proc.stderr[-3000:]
  rows = json.loads(out.read_text())["tiny"]
  assert set(rows) == {"full", "lora_r16", "qlora_int8", "qlora_nf4"}
  for variant in ("lora_r16", "qlora_int8", "qlora_nf4"):
    assert rows[variant]["peak_vs_full"] < 1 and rows[variant]["checkpoint_vs_full"] < 0.5
    assert rows[variant]["step_s"] > 0  # tiny has 2 layers: timed at 1 and 3, interpolated
    assert set(rows[variant]["step_s_by_depth"]) == {"1", "3"}
