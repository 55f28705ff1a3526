"""Shared fixtures: tiny experiments on the bundled corpus, run on CPU."""

from __future__ import annotations

import os
import sys


# Tiny test models compile twice as fast without XLA's backend optimisations; set before
# jax starts, inherited by the launcher subprocesses.
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_backend_optimization_level=0").strip()

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # `experiments` and `launch` import from the checkout

collect_ignore = ["multidevice"]  # run by test_multidevice.py with 8 simulated devices
