"""Shared fixtures: tiny experiments on the bundled corpus, run on CPU."""

from __future__ import annotations

import os
import sys
import tempfile


# Tiny test models compile twice as fast without XLA's backend optimisations; set before
# jax starts, inherited by the launcher subprocesses.
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_backend_optimization_level=0").strip()

# Many tests compile the same tiny programs: share XLA's persistent cache across them and
# the subprocesses they start.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR",
                      os.path.join(tempfile.gettempdir(), "lmjax-tests-xla-cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.3")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # `experiments` and `launch` import from the checkout

collect_ignore = ["multidevice"]  # run by test_multidevice.py with 8 simulated devices
