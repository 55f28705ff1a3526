"""Compiles an experiment's train step for a TPU topology on this machine (needs libtpu:
pip install -e ".[tpu]"); prints and writes what the run would cost.

  python -m launch.compile --config experiments/llama_1b.py:fsdp --topology v5e:4x4 \
      [--num_slices 1] [--output compile.json] [--config.train.batch_size=64 ...]
  python -m launch.compile --config experiments/chat_tiny.py --init_from runs/clm_tiny \
      --topology v5e:2x2                     # any objective: MLM, SFT, DPO, a task head

Per-device memory (arguments, temporaries, outputs, code) against the chip's HBM,
compiled FLOPs against lmjax's MFU formula, XLA's step-time estimate with the
tokens/s and MFU it implies, and the collectives in the compiled HLO. A config
that does not fit says so in one line and exits 1.
"""

from __future__ import annotations

import json
import sys
import time

from absl import app, flags
from ml_collections import config_flags

from launch.cli import cli_main, parse_flags, write_json
from lmjax.experiment import experiment_from_dict

config_flags.DEFINE_config_file("config", None, "experiment file, e.g. experiments/gpt2_small.py")
flags.DEFINE_string("topology", None, "TPU topology: v5e:4x4, v5p:2x2x2, v4:2x2x4, ...")
flags.DEFINE_integer("num_slices", 1, "slices of that topology (multislice)", lower_bound=1)
flags.DEFINE_string("output", "", "also write the report to this JSON file")
flags.DEFINE_string("init_from", None, "a fine-tuning experiment's pretrained model (an lmjax "
                    "run or a Hugging Face directory): its architecture is compiled")
flags.mark_flags_as_required(["config", "topology"])
FLAGS = flags.FLAGS


@cli_main
def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  from lmjax import aot
  config = FLAGS.config.to_dict()
  if FLAGS.init_from:
    config.setdefault("train", {})["init_from"] = FLAGS.init_from
  exp = experiment_from_dict(config)
  start = time.perf_counter()
  report = aot.compile_for_topology(exp, FLAGS.topology, FLAGS.num_slices)
  report["compile_seconds"] = time.perf_counter() - start
  print(json.dumps(report, indent=2))
  if FLAGS.output:
    write_json(FLAGS.output, report)
  if not report["fits"]:
    mem = report.get("memory_per_device")
    why = report.get("compiler_says") or (
        f"{mem['total'] / 2**30:.2f} GiB per device (arguments {mem['arguments'] / 2**30:.2f}, "
        f"temporaries {mem['temporaries'] / 2**30:.2f})")
    print(f"error: does not fit {FLAGS.topology} ({report['chip_hbm_bytes'] / 2**30:.0f} GiB HBM "
          f"per chip): {why}", file=sys.stderr)
    sys.exit(1)


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
