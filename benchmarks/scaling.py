"""Step time at one global batch: 1 process x 1 device, 1 x 2 simulated devices, 2 processes
x 1 device over gloo (127.0.0.1). Prints tokens/s and each ratio to the first, in one run.

  python -m benchmarks.scaling [--config experiments/clm_tiny.py] [--steps 20]
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile

from absl import app, flags

FLAGS = flags.FLAGS
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SETUPS = [("1 process x 1 device", 1, 1), ("1 process x 2 devices", 1, 2),
          ("2 processes x 1 device (gloo)", 2, 1)]


def tokens_per_s(processes: int, devices: int, workdir: str, config: str = "experiments/clm_tiny.py",
                 steps: int = 20) -> float:
  train = [f"--config={config}", f"--workdir={workdir}",
           f"--config.train.steps={steps + 1}", f"--config.train.log_every={steps + 1}",
           "--config.train.eval_batches=1", "--config.train.checkpoint_every=1000000"]
  if processes == 1:
    cmd = ["launch.train", f"--cpu_devices={devices}", *train]
  else:
    cmd = ["launch.local", f"--num_processes={processes}", f"--devices_per_process={devices}",
           "--", *train]
  subprocess.run([sys.executable, "-m", *cmd], cwd=REPO, check=True, capture_output=True)
  records = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
  return [r for r in records if r["split"] == "train"][-1]["tokens_per_s"]


def main(argv):
  del argv
  rates = []
  for name, processes, devices in SETUPS:
    with tempfile.TemporaryDirectory() as workdir:
      rates.append((name, tokens_per_s(processes, devices, workdir, FLAGS.config, FLAGS.steps)))
  base = rates[0][1]
  print(f"{'setup':32s} {'tokens/s':>10s} {'step time vs 1x1':>17s}")
  for name, rate in rates:
    print(f"{name:32s} {rate:10,.0f} {base / rate:16.2f}x")


if __name__ == "__main__":
  flags.DEFINE_string("config", "experiments/clm_tiny.py", "experiment file")
  flags.DEFINE_integer("steps", 20, "timed steps (after one compiled step)")
  app.run(main)
