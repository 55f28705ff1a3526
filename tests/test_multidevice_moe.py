"""The mixture of experts' sharded runs (tests/multidevice/test_moe_sharding.py) with 8
simulated devices, in a process of their own: a file of their own too, so xdist can run them
beside the rest of the 8-device suite (tests/test_multidevice.py)."""

from test_multidevice import MOE, _suite


def test_expert_parallel_suite_with_8_simulated_devices():
  _suite(MOE)
