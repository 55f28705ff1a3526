"""Runs with 8 simulated CPU devices; `tests/test_multidevice.py` starts this suite in
its own process, because the device count is fixed once a backend exists."""

import os
import sys

import jax

TESTS = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [TESTS, os.path.dirname(TESTS)]  # tiny.py; experiments/
jax.config.update("jax_num_cpu_devices", 8)
