"""Cluster launchers (SLURM, TPU), sweeps and runtime settings."""

import csv
import os
import stat
import subprocess
import tarfile
import sys

import pytest

from lmjax.distributed import DistributedConfig, RuntimeConfig, apply_runtime
from lmjax.errors import UserError
from lmjax.sweep import Choice, IntUniform, LogUniform, Sweep, load_sweep
from tiny import ROOT, TINY_OVERRIDES


def _run(*args, env=None, timeout=300):
  return subprocess.run([sys.executable, "-m", *args], cwd=ROOT, capture_output=True, text=True,
                        timeout=timeout, env=env)


def _fake_tool(tmp_path, name):
  """A stand-in for sbatch/gcloud on PATH that records its arguments."""
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir(exist_ok=True)
  tool = bin_dir / name
  tool.write_text(f'#!/bin/sh\necho "$@" >> {tmp_path}/{name}.calls\necho "Submitted batch job 42"\n')
  tool.chmod(tool.stat().st_mode | stat.S_IEXEC)
  return {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"}


def test_slurm_script_and_submit(tmp_path):
  script = tmp_path / "job.sbatch"
  env = _fake_tool(tmp_path, "sbatch")
  proc = _run("launch.slurm", "--nodes=4", "--gpus_per_node=8", "--partition=a100",
              f"--script={script}", "--setup=source venv/bin/activate", "--submit", "--",
              "--config", "experiments/gpt2_small.py", "--workdir", "runs/gpt2", env=env)
  assert proc.returncode == 0, proc.stderr
  text = script.read_text()
  for line in ("#SBATCH --nodes=4", "#SBATCH --ntasks-per-node=8", "#SBATCH --gpus-per-node=8",
               "#SBATCH --partition=a100", "source venv/bin/activate",
               "srun --kill-on-bad-exit=1 python -m launch.train --config "
               "experiments/gpt2_small.py --workdir runs/gpt2"):
    assert line in text
  assert (tmp_path / "sbatch.calls").read_text().strip() == str(script)
  assert "Submitted batch job 42" in proc.stdout


def test_slurm_one_process_per_node(tmp_path):
  proc = _run("launch.slurm", "--nodes=2", "--process_per=node", f"--script={tmp_path / 'j'}",
              "--", "--config", "experiments/llama_1b.py:fsdp", "--workdir", "w")
  assert proc.returncode == 0 and "#SBATCH --ntasks-per-node=1" in proc.stdout


def test_tpu_commands_printed_and_run(tmp_path):
  env = _fake_tool(tmp_path, "gcloud")
  args = ["launch.tpu", "--tpu=pod", "--zone=us-east5-a", "--project=p", "--",
          "--config", "experiments/llama_1b.py:fsdp", "--workdir", "gs://b/run"]
  printed = _run(*args, env=env).stdout.splitlines()
  assert printed[0].startswith("tar czf")
  assert printed[1].startswith("gcloud compute tpus tpu-vm scp") and "--worker=all" in printed[1]
  assert "pip install" in printed[2] and "--project=p" in printed[2]
  assert "python -m launch.train --config experiments/llama_1b.py:fsdp --workdir gs://b/run" \
      in printed[3]
  assert not (tmp_path / "gcloud.calls").exists()  # a dry run runs nothing
  proc = _run(*args[:4], "--run", *args[4:], env=env)
  assert proc.returncode == 0, proc.stderr
  calls = (tmp_path / "gcloud.calls").read_text().splitlines()
  assert len(calls) == 3 and all("--zone=us-east5-a" in c for c in calls)
  with tarfile.open("/tmp/lmjax-src.tgz") as packed:  # the source, not virtualenvs or caches
    names = packed.getnames()
  assert "./lmjax/train.py" in names and "./setup.py" in names
  assert not [n for n in names if n.startswith("./.venv") or "__pycache__" in n]


def test_sweep_grid_and_seeded_random_search():
  sweep = Sweep(grid={"optimizer.warmup_steps": [10, 50]},
                random={"optimizer.learning_rate": LogUniform(1e-4, 1e-2),
                        "model.dropout_rate": Choice((0.0, 0.1))},
                num_samples=3, seed=7, fixed={"train.steps": 100})
  trials = sweep.trials()
  assert len(trials) == 6 and len({t.name for t in trials}) == 6
  assert all(1e-4 <= t.overrides["optimizer.learning_rate"] <= 1e-2 for t in trials)
  assert all(t.overrides["train.steps"] == 100 for t in trials)
  assert [t.overrides for t in trials] == [t.overrides for t in sweep.trials()]  # seeded
  lr_tiny = load_sweep(os.path.join(ROOT, "experiments", "sweeps", "lr_tiny.py")).trials()
  assert len(lr_tiny) == 4


def test_a_random_sweep_draws_int_ranges_on_their_lattice_and_refuses_bad_ones():
  sweep = Sweep(random={"optimizer.warmup_steps": IntUniform(0, 60, step=15),
                        "train.batch_size": IntUniform(8, 64, log=True)}, num_samples=200)
  sweep.check()
  draws = [t.overrides for t in sweep.trials()]
  assert {d["optimizer.warmup_steps"] for d in draws} == {0, 15, 30, 45, 60}
  sizes = [d["train.batch_size"] for d in draws]
  assert min(sizes) >= 8 and max(sizes) <= 64 and all(isinstance(s, int) for s in sizes)
  assert sum(s < 23 for s in sizes) > sum(s > 49 for s in sizes)  # log: as many per octave
  for bad, message in ((Sweep(random={"a": IntUniform(0, 50, step=15)}), "step 15 does not"),
                       (Sweep(grid={"a": []}), "a grid axis needs a non-empty list"),
                       (Sweep(random={"a": LogUniform(0.0, 1.0)}), "a log range needs")):
    with pytest.raises(UserError, match=message):
      bad.check()


def test_sweep_runs_trials_summarizes_and_skips_finished(tmp_path):
  """The README's sweep command, on a two-point grid of its own: two trials show the
  summary's order as well as the shipped four would (experiments/sweeps/lr_tiny.py is
  loaded and expanded by test_sweep_grid_and_seeded_random_search above)."""
  workdir, sweep = tmp_path / "sweep", tmp_path / "lr_two.py"
  sweep.write_text("from lmjax.sweep import Sweep\n\ndef get_sweep():\n"
                   "  return Sweep(grid={'optimizer.learning_rate': [1e-3, 4e-3]})\n")
  overrides = dict(TINY_OVERRIDES, **{"train.steps": 6, "train.eval_every": 3,
                                      "data.cache_dir": str(tmp_path / "cache")})
  extra = [f"--config.{k}={v}" for k, v in overrides.items()]
  proc = _run("launch.sweep", "--config=experiments/clm_tiny.py", f"--sweep={sweep}",
              f"--workdir={workdir}", "--parallel=2", "--", *extra, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  rows = list(csv.DictReader(open(workdir / "summary.csv")))
  assert len(rows) == 2
  best = [float(r["best_eval_loss"]) for r in rows]
  assert best == sorted(best) and all(float(r["tokens_per_s"]) > 0 for r in rows)
  assert "| 1 |" in (workdir / "summary.md").read_text()
  assert (workdir / "loss_curves.png").read_bytes()[:4] == b"\x89PNG"
  # Again, in this process (launch.sweep's main is this call): every trial is finished.
  from absl import logging

  from lmjax.sweep.run import SweepOptions, run_sweep
  said, original = [], logging.info
  logging.info = lambda msg, *a: said.append(msg % a if a else msg)
  try:
    again = run_sweep(load_sweep(str(sweep)), SweepOptions(
        config=os.path.join(ROOT, "experiments", "clm_tiny.py"), sweep=str(sweep),
        workdir=str(workdir), extra=tuple(extra), parallel=2))
  finally:
    logging.info = original
  assert not again.failed and "2 trials, 2 finished, 0 to run" in said, said


def test_runtime_settings_reach_xla(monkeypatch):
  monkeypatch.setenv("XLA_FLAGS", "--xla_dump_to=/tmp/x")
  monkeypatch.setattr("jax.config.update", lambda *a: None)  # the backend is already up
  apply_runtime(RuntimeConfig(gpu_collective_combine_bytes=1 << 26, xla_flags="--foo=1"))
  flags = os.environ["XLA_FLAGS"].split()
  assert flags[0] == "--xla_dump_to=/tmp/x"
  assert "--xla_gpu_enable_latency_hiding_scheduler=true" in flags
  assert "--xla_gpu_all_gather_combine_threshold_bytes=67108864" in flags and flags[-1] == "--foo=1"


def test_distributed_settings_from_flags_then_environment(monkeypatch):
  monkeypatch.setenv("LMJAX_COORDINATOR_ADDRESS", "10.0.0.1:1234")
  monkeypatch.setenv("LMJAX_NUM_PROCESSES", "4")
  monkeypatch.setenv("LMJAX_PROCESS_ID", "2")
  cfg = DistributedConfig.from_env(process_id=-1, num_processes=0, coordinator_address="")
  assert (cfg.coordinator_address, cfg.num_processes, cfg.process_id) == ("10.0.0.1:1234", 4, 2)
  cfg = DistributedConfig.from_env(process_id=1, heartbeat_timeout_s=5)
  assert cfg.process_id == 1 and cfg.heartbeat_timeout_s == 5
  cfg = DistributedConfig.from_env(process_id=0)  # process 0 is a value, not "unset"
  assert cfg.process_id == 0
