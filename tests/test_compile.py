"""launch.compile: the train step compiled for a TPU topology on this CPU machine (libtpu)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tiny import ROOT, tiny_config
from lmjax import aot
from lmjax.experiment import experiment_from_dict


# All ops over the formula's matmuls: at d_model 32 the non-matmul share is large (measured
# 1.23 clm, 1.25 mlm; clm_tiny as shipped, d_model 128: 1.05).
# mlm_tiny also compiles the fused vocabulary head (`auto` leaves it off on a TPU), with two
# unrolled layers: its counts are its own program's (one compile, not three; the 1- and
# 2-layer extrapolation of a scanned stack is clm_tiny's).
@pytest.mark.parametrize("name,mesh,bound,fused,layers", [
    ("clm_tiny", (4, 1, 1), 1.35, "auto", 4), ("mlm_tiny", (1, 4, 1), 1.35, "on", 2)])
def test_tiny_experiments_compile_for_a_v5e_topology(tmp_path, name, mesh, bound, fused,
                                                      layers):
  scan = layers > 2
  config = tiny_config(name, tmp_path, model__num_layers=layers, model__scan_layers=scan,
                       objective__fused_head=fused)
  config.mesh.data, config.mesh.fsdp, config.mesh.tensor = mesh
  report = aot.compile_for_topology(experiment_from_dict(config.to_dict()), "v5e:2x2")
  assert report["devices"] == 4 and report["fits"]
  # `auto` resolves as on a TPU: the splash Pallas kernel is in the compiled program.
  assert report["attention_impl"] == "splash" and report["pallas_kernels"] > 0
  assert report["fused_head"] == ("off" if fused == "auto" else fused)
  mem = report["memory_per_device"]
  assert mem["arguments"] > 0 and mem["code"] > 0 and 0 < mem["total"] < report["chip_hbm_bytes"]
  # Four scanned layers, counted from 1- and 2-layer compiles; two unrolled: as compiled.
  assert report["counted"] == ("1- and 2-layer unrolled programs, extrapolated" if scan
                               else "program"), report["counted"]
  assert 0.95 < report["flops_per_step"]["ratio"] < bound, report["flops_per_step"]
  assert report["step_seconds_estimate"] > 0 and 0 < report["mfu"] <= 1
  assert report["bound"] in ("compute", "memory")
  ops = report["collectives"]
  assert ops["all-reduce"]["count"] > 0 and ops["all-reduce"]["bytes"] > 0  # gradients
  if mesh[1] > 1:  # FSDP gathers sharded parameters and scatters their gradients
    assert ops["all-gather"]["count"] > 0 and ops["reduce-scatter"]["count"] + \
        ops["all-reduce"]["count"] > 0


def test_a_config_that_cannot_fit_is_refused_in_one_line(tmp_path):
  proc = subprocess.run(
      [sys.executable, "-m", "launch.compile", "--config=experiments/clm_tiny.py",
       "--topology=v5e:2x2", f"--output={tmp_path / 'big.json'}",
       "--config.model.d_model=8192", "--config.model.d_ff=32768", "--config.model.num_layers=2",
       "--config.model.num_heads=64"], cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 1, proc.stderr[-3000:]
  errors = [l for l in proc.stderr.splitlines() if l.startswith("error:")]
  assert len(errors) == 1 and "does not fit v5e:2x2 (16 GiB HBM per chip)" in errors[0]
  assert "Traceback" not in proc.stderr
  assert json.loads((tmp_path / "big.json").read_text())["fits"] is False


def test_bad_topology_is_one_line():
  proc = subprocess.run([sys.executable, "-m", "launch.compile", "--config=experiments/clm_tiny.py",
                         "--topology=v9z:4"], cwd=ROOT, capture_output=True, text=True,
                        timeout=120)
  assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1].startswith(
      "error: --topology 'v9z:4'")


def test_splash_is_compiled_and_its_flops_are_counted(tmp_path):
  """XLA's cost analysis does not see inside a Pallas kernel: the report adds the
  kernel's attention FLOPs, so splash and dense XLA estimate comparable work."""
  reports = {}
  for impl in ("splash", "xla"):
    config = tiny_config("clm_tiny", tmp_path, data__seq_len=1024, model__max_len=1024,
                         model__num_layers=1, model__attention_impl=impl)
    reports[impl] = aot.compile_for_topology(experiment_from_dict(config.to_dict()), "v5e:2x2")
  assert reports["splash"]["pallas_kernels"] > 0 and reports["xla"]["pallas_kernels"] == 0
  flops = {k: r["flops_per_step"] for k, r in reports.items()}
  assert flops["splash"]["of_which_attention_kernel"] > 0
  assert flops["xla"]["of_which_attention_kernel"] == 0
  # Dense XLA computes the full causal square; splash visits (n + 1) / 2n of the blocks.
  assert 0.5 < flops["splash"]["compiled"] / flops["xla"]["compiled"] < 1.0, flops


def test_the_docs_table_plans_every_variant_the_issue_names():
  from benchmarks import tpu_table
  exp = tpu_table.experiment("llama_1b", 8192, 16, "fsdp", "full", "splash")
  assert (exp.data.seq_len, exp.model.max_len, exp.train.batch_size) == (8192, 8192, 32)
  assert (exp.mesh.data, exp.mesh.fsdp, exp.model.remat_policy) == (1, -1, "full")
  rows = tpu_table.plan(quick=False, only=[])
  for model in ("gpt2_small", "bert_base", "llama_1b"):
    for chips in ("v5e-16", "v5p-8"):
      assert {(r[3], r[4]) for r in rows if r[:3] == (model, chips, 2048) and len(r) == 5} == \
          {(m, p) for m in ("data", "fsdp") for p in ("dots_no_batch", "full")}
  assert {(r[2], r[5]) for r in rows if len(r) == 6} == {(2048, "xla"), (8192, "splash"),
                                                         (8192, "xla")}
  for name in ("qwen3_tiny:0.6b", "gemma_tiny:2b"):  # issue #34's shapes
    assert {r[4] for r in rows if r[0] == name and r[1] == "v5e-16"} == set(tpu_table.REMAT)
  gemma = tpu_table.experiment("gemma_tiny:2b", 2048, 16, "fsdp", "full")
  assert (gemma.model.d_model, gemma.model.sliding_window, gemma.train.batch_size) == \
      (2304, 4096, 128)


# Qwen 3's one compile-time feature, qk-norm (qk_norm="head"), is Gemma 3's too: the gemma3
# case compiles it.
@pytest.mark.parametrize("name,arg", [("gemma_tiny", None), ("gemma_tiny", "gemma3")])
def test_todays_families_compile_for_a_tpu_topology(tmp_path, name, arg):
  """qk-norm, interleaved sliding-window and global layers and soft-capping compile into
  splash kernels on a TPU topology (its local mask and soft-cap), scanned."""
  # Gemma 3's five local layers to a global one, shortened to one of each: the scanned stack
  # reads each layer's kind as data either way, and at more than two layers the report adds
  # two counting compiles (their extrapolation: test_tiny_experiments_compile_for_...).
  config = tiny_config(name, tmp_path, arg, model__num_layers=2, model__scan_layers=True,
                       model__layer_types=("local", "global"),
                       model__num_kv_heads=1, model__head_dim=128, model__attn_scale_dim=0.0,
                       model__sliding_window=64, data__seq_len=256)
  report = aot.compile_for_topology(experiment_from_dict(config.to_dict()), "v5e:2x2")
  assert report["fits"] and report["attention_impl"] == "splash"
  assert report["pallas_kernels"] > 0


@pytest.mark.parametrize("name", ["chat_tiny", "dpo_tiny", "finetune_pairs"])
def test_fine_tuning_experiments_compile_through_the_same_run_builder(tiny_runs, tmp_path,
                                                                       name):
  """launch.compile builds the run launch.train would (one builder): an SFT, DPO or
  task-head step compiles for a TPU topology, with init_from's architecture. chat_tiny
  through launch.compile itself; the others through the call its main makes."""
  init = tiny_runs / ("mlm_tiny" if name == "finetune_pairs" else "clm_tiny")
  out = tmp_path / "report.json"
  flags = {"data.seq_len": 64, "train.batch_size": 8, "mesh.data": 4}
  if name == "chat_tiny":
    proc = subprocess.run(
        [sys.executable, "-m", "launch.compile", f"--config=experiments/{name}.py",
         f"--init_from={init}", "--topology=v5e:2x2", f"--output={out}",
         *[f"--config.{k}={v}" for k, v in flags.items()]],
        cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
  else:
    import importlib
    config = importlib.import_module(f"experiments.{name}").get_config()
    for key, value in flags.items():
      section, field = key.split(".")
      config[section][field] = value
    config = config.to_dict()
    config["train"]["init_from"] = str(init)  # as launch.compile's --init_from sets it
    report = aot.compile_for_topology(experiment_from_dict(config), "v5e:2x2")
  kind = {"chat_tiny": "sft", "dpo_tiny": "dpo", "finetune_pairs": "classification"}[name]
  assert report["objective"] == kind and report["fits"] and report["devices"] == 4
  assert report["memory_per_device"]["arguments"] > 0
  assert report["collectives"]["all-reduce"]["count"] > 0  # data-parallel gradients
  ratio = report["flops_per_step"]["ratio"]
  # DPO runs two rows per pair (its head counted twice); a task head's vocabulary is none.
  assert (0.9 < ratio < 1.6) if kind != "classification" else ratio > 0.9, report


@pytest.mark.parametrize("arg", [None, "capacity"])
def test_expert_parallel_moe_compiles_for_a_tpu_topology_with_all_to_all(tmp_path, arg):
  """moe_tiny's experts over an expert axis of 4: dropless dispatch exchanges tokens by
  all-to-all under shard_map (its grouped matmuls as ragged_dot, TPU's choice), capacity
  dispatch by the all-to-all XLA makes of its sharding constraint."""
  config = tiny_config("moe_tiny", tmp_path, arg, model__num_layers=2, model__moe__d_ff=64)
  config.mesh.data, config.mesh.fsdp, config.mesh.expert = 1, 1, 4
  report = aot.compile_for_topology(experiment_from_dict(config.to_dict()), "v5e:2x2")
  assert report["devices"] == 4 and report["fits"]
  assert report["collectives"]["all-to-all"]["count"] > 0, report["collectives"]


def test_the_family_shapes_docs_compile_commands_are_valid_experiments():
  """docs/scaling.md's `launch.compile` commands for the 0.5B Qwen- and 2B Gemma-shaped
  variants name real variants and options, on the topology the table states (compiling
  them takes many minutes: the table's figures come from running them, not from here)."""
  import os
  import re

  from experiments import gemma_tiny, qwen3_tiny
  text = open(os.path.join(ROOT, "docs", "scaling.md")).read()
  pattern = (r"python -m launch\.compile --config experiments/(qwen3_tiny|gemma_tiny)\.py:"
             r"([\w.]+) --topology ([\w:]+)((?: --config\.[\w.]+=[^\s`]+)*)")
  commands = re.findall(pattern, text)
  assert {(name, arg) for name, arg, _, _ in commands} == {("qwen3_tiny", "0.6b"),
                                                           ("gemma_tiny", "2b")}, commands
  for name, arg, topology, options in commands:
    config = {"qwen3_tiny": qwen3_tiny, "gemma_tiny": gemma_tiny}[name].get_config(arg)
    for option in options.split():
      key, value = option.removeprefix("--config.").split("=")
      section, field = key.split(".")
      config[section][field] = type(config[section][field])(value)
    exp = experiment_from_dict(config.to_dict())
    chips = len(aot.topology_devices(topology))
    assert exp.objective.fused_head == "on"  # the vocabulary's (rows, V) logits never exist
    assert exp.mesh.fsdp == -1 and exp.train.batch_size % chips == 0
    assert exp.model.vocab_size > 150_000 and exp.model.scan_layers


def test_counting_compiles_that_do_not_fit_fall_back_to_the_scanned_program(tmp_path,
                                                                          monkeypatch):
  """moe_1b:ep8 on v5e:4x4: the scanned step fits, the unrolled 2-layer counting compile
  ran out of memory and the report was a traceback. Now its counts are the scanned
  program's (each layer once), and the report says so."""
  config = tiny_config("clm_tiny", tmp_path, None, model__num_layers=3,
                       model__scan_layers=True)
  real = aot._compile
  monkeypatch.setattr(aot, "_compile", lambda exp, source, devices, options=None: (
      "Ran out of memory" if options else real(exp, source, devices, options)))
  report = aot.compile_for_topology(experiment_from_dict(config.to_dict()), "v5e:2x2")
  assert report["fits"] and report["counted"].startswith("scanned program"), report
  assert 0 < report["flops_per_step"]["ratio"] < 1, report  # 1 of 3 layers counted


def test_donated_state_is_counted_once_in_the_memory_total():
  """The train state is donated: XLA reports it in the arguments and in the outputs, and
  once more as `aliased`. Peak use holds it once (lmjax's total counted it twice)."""
  from types import SimpleNamespace
  mem = SimpleNamespace(argument_size_in_bytes=100, output_size_in_bytes=90,
                        temp_size_in_bytes=40, generated_code_size_in_bytes=5,
                        alias_size_in_bytes=90)
  assert aot.memory_per_device(mem)["total"] == 100 + 40 + 5
