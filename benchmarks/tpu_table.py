"""The docs/scaling.md table: shipped experiments compiled for TPU topologies on this CPU.

  python -m benchmarks.tpu_table [--json OUT] [--quick]

Each row is `launch.compile`'s report (lmjax.aot) for one variant: gpt2_small,
bert_base and llama_1b at seq 2048 with 16K tokens per chip, data-parallel vs
FSDP, two remat policies, on v5e-16 (v5e:4x4) and v5p-8 (v5p:2x2x1, 4 chips);
llama_1b's attention, splash vs XLA, at seq 2048 and 8192; and Qwen3-0.6B- and Gemma
2 2B-shaped models (`qwen3_tiny:0.6b`, `gemma_tiny:2b`) with FSDP on v5e-16. Rows print as
they finish (each compile takes minutes here), llama_1b first. Needs libtpu
(pip install -e ".[tpu]"). --quick compiles llama_1b on v5e-16 only.
"""

from __future__ import annotations

import dataclasses
import json
import time

from absl import app, flags

from lmjax import aot
from lmjax.experiment import Experiment, experiment_from_dict

FLAGS = flags.FLAGS
TOPOLOGIES = {"v5e-16": "v5e:4x4", "v5p-8": "v5p:2x2x1"}
MESHES = {"data": (-1, 1), "fsdp": (1, -1)}
REMAT = ("dots_no_batch", "full")
TOKENS_PER_CHIP = 8 * 2048  # per step: 8 sequences of 2048, 2 of 8192
FAMILY_SHAPES = ("qwen3_tiny:0.6b", "gemma_tiny:2b")  # Qwen3-0.6B, Gemma 2 2B


def experiment(name: str, seq: int, chips: int, mesh: str, remat: str,
               attention: str = "auto") -> Experiment:
  """`name`: an experiment file, `FILE:VARIANT` for a variant."""
  file, _, variant = name.partition(":")
  module = __import__(f"experiments.{file}", fromlist=["get_config"])
  config = module.get_config(variant) if variant else module.get_config()
  exp = experiment_from_dict(config.to_dict())
  data, fsdp = MESHES[mesh]
  model = exp.model.replace(max_len=max(exp.model.max_len, seq), remat_policy=remat,
                            attention_impl=attention)
  return dataclasses.replace(
      exp, model=model, data=dataclasses.replace(exp.data, seq_len=seq),
      train=dataclasses.replace(exp.train, batch_size=TOKENS_PER_CHIP // seq * chips,
                                grad_accum_steps=1),
      mesh=dataclasses.replace(exp.mesh, data=data, fsdp=fsdp, tensor=1))


def measure(name: str, topology: str, seq: int, mesh: str, remat: str,
            attention: str = "auto") -> dict:
  chips = len(aot.topology_devices(TOPOLOGIES[topology]))
  start = time.perf_counter()
  report = aot.compile_for_topology(experiment(name, seq, chips, mesh, remat, attention),
                                    TOPOLOGIES[topology])
  row = {"model": name, "topology": topology, "seq": seq, "mesh": mesh, "remat": remat,
         "attention": report.get("attention_impl", attention), "fits": report["fits"],
         "compile_s": time.perf_counter() - start, "report": report}
  gib = lambda b: b / 2**30
  head = f"| {name} | {topology} | {seq} | {mesh} | {remat} | {row['attention']} |"
  mem = report.get("memory_per_device")
  if mem:  # compiled: the program's memory (it may still exceed the chip's HBM)
    line = (f"{head} {gib(mem['total']):.1f}{'' if report['fits'] else ' (over HBM)'} | "
            f"{gib(mem['temporaries']):.1f} | {report['step_seconds_estimate'] * 1e3:.0f} | "
            f"{report['mfu']:.0%} | {row['compile_s']:.0f} |")
  else:  # the compiler refused: its own words
    line = f"{head} does not fit: {report['compiler_says'][:60]} | | | | {row['compile_s']:.0f} |"
  print(line, flush=True)
  return row


def plan(quick: bool, only: list[str]) -> list[tuple]:
  """(model, topology, seq, mesh, remat, attention) rows, llama_1b first: it decides what
  ships. --only model names keep those models' rows."""
  rows = [("llama_1b", "v5e-16", 2048, mesh, remat) for mesh in MESHES for remat in REMAT]
  rows += [("llama_1b", "v5e-16", 2048, "fsdp", "dots_no_batch", "xla")]
  rows += [("llama_1b", "v5e-16", 8192, "fsdp", "dots_no_batch", a) for a in ("splash", "xla")]
  # Today's families at their shipped shapes (qk-norm, sliding windows, soft-capping).
  rows += [(name, "v5e-16", 2048, "fsdp", remat) for name in FAMILY_SHAPES for remat in REMAT]
  if not quick:
    rows += [("llama_1b", "v5p-8", 2048, mesh, remat) for mesh in MESHES for remat in REMAT]
    rows += [(name, topology, 2048, mesh, remat) for topology in TOPOLOGIES
             for name in ("gpt2_small", "bert_base") for mesh in MESHES for remat in REMAT]
  return [r for r in rows if not only or r[0] in only]


def main(argv: list[str]) -> None:
  del argv
  print("| model | chips | seq | mesh | remat | attention | GiB/chip | temp GiB | est. ms/step "
        "| MFU | compile s |\n|---|---|---|---|---|---|---|---|---|---|---|", flush=True)
  rows = []
  for variant in plan(FLAGS.quick, FLAGS.only):
    rows.append(measure(*variant))
    if FLAGS.json:  # after every row: a long table stopped early keeps what it made
      with open(FLAGS.json, "w") as f:
        json.dump(rows, f, indent=1)


if __name__ == "__main__":
  # Defined here, not at import: other benchmark modules define --json too, and the tests
  # import this one next to them.
  flags.DEFINE_string("json", "", "write every report to this JSON file")
  flags.DEFINE_bool("quick", False, "llama_1b on v5e-16 only")
  flags.DEFINE_list("only", [], "only these models' rows")
  app.run(main)
