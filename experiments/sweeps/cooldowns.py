"""Three cooldowns branched from one stable run: 50, 100 and 200 steps of 1-sqrt decay from
step 400 of runs/stable.

  python -m launch.train --config experiments/clm_tiny.py --workdir runs/stable \
      --config.optimizer.schedule=constant --config.train.steps=400
  python -m launch.sweep --config experiments/clm_tiny.py --sweep experiments/sweeps/cooldowns.py \
      --workdir runs/cooldowns --parallel 2 -- --config.train.branch_from=runs/stable:400

Each trial is a new run that starts from the stable run's whole state at step 400
(`train.branch_from`) and trains to its own `train.steps` (450, 500, 600) under a wsd
schedule whose decay starts at 400: it ends bit for bit where a wsd run of that length
from step 0 ends, for the stable run's 400 steps plus its own cooldown. The stable run
must keep a checkpoint at the branch step (`train.checkpoint_every`, `keep_checkpoints`);
branch elsewhere with `--config.train.branch_from=runs/stable:K
--config.optimizer.decay_start=K`. Measured (`python -m benchmarks.wsd`):
docs/scaling.md.
"""

from lmjax.sweep import Sweep

BRANCH = 400


def get_sweep() -> Sweep:
  return Sweep(grid={"train.steps": [BRANCH + c for c in (50, 100, 200)]},
               fixed={"optimizer.schedule": "wsd", "optimizer.decay_start": BRANCH,
                      "optimizer.decay_shape": "1-sqrt", "optimizer.end_lr_ratio": 0.0})
