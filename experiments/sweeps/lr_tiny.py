"""Four learning rates on clm_tiny.

  python -m launch.sweep --config experiments/clm_tiny.py --sweep experiments/sweeps/lr_tiny.py \
      --workdir runs/sweep [--parallel 2]
"""

from lmjax.sweep import Sweep


def get_sweep() -> Sweep:
  return Sweep(grid={"optimizer.learning_rate": [5e-4, 1e-3, 2e-3, 4e-3]})
