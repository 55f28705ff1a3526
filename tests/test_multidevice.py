import os
import subprocess
import sys

from tiny import ROOT

MOE = os.path.join(ROOT, "tests", "multidevice", "test_moe_sharding.py")


def _suite(*args: str) -> None:
  proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *args],
                        cwd=ROOT, capture_output=True, text=True, timeout=1800)
  assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-2000:]
  assert " passed" in proc.stdout and "failed" not in proc.stdout


def test_multidevice_suite_with_8_simulated_devices():
  """tests/multidevice needs 8 CPU devices, fixed at backend start: its own process."""
  _suite(os.path.join(ROOT, "tests", "multidevice"), f"--ignore={MOE}")
