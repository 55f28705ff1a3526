"""An optimizer of your own, written entirely in this file: Signum.

  python -m launch.train --config experiments/custom_optimizer.py --workdir runs/signum
  python -m launch.train --config experiments/custom_optimizer.py --workdir runs/signum \
      --config.optimizer.signum_momentum=0.95 --config.optimizer.learning_rate=3e-4

Signum (Bernstein et al., 2018, "signSGD: Compressed Optimisation for Non-Convex
Problems") steps by the sign of a momentum of the gradients: Lion without its second
interpolation, one moment of state. Weight decay is decoupled and multiplied by the
learning rate, on kernels and embeddings only, as in lmjax's own optimizers.

Nothing in lmjax is edited: the class below subclasses `lmjax.optim.Optimizer`, adds an
option (`optimizer.signum_momentum`, typed, overridable, a typo is an error) and
registers itself when `launch.train` loads this file. The training loop gives it what it
gives AdamW: global-norm clipping before it, the schedule (warmup, decay, wsd), sharding
of its state like the parameters, checkpoints and exact resume.
"""

import dataclasses

import jax
import jax.numpy as jnp
import ml_collections
import optax

from lmjax import optim
from experiments import clm_tiny


@dataclasses.dataclass(frozen=True)
class SignumConfig(optim.OptimizerConfig):  # the shared options (schedule, decay...) and one more
  kind: str = "signum"
  signum_momentum: float = 0.9  # momentum of the gradients whose sign is the step

  def __post_init__(self):
    super().__post_init__()
    if not 0 <= self.signum_momentum < 1:
      raise ValueError(f"optimizer.signum_momentum must be in [0, 1), got {self.signum_momentum}")


@optim.register("signum")
class Signum(optim.Optimizer):
  config_class = SignumConfig

  def transform(self, schedule):
    c = self.cfg
    sign = optax.GradientTransformation(
        lambda params: optax.EmptyState(),
        lambda updates, state, params=None: (jax.tree.map(jnp.sign, updates), state))
    return optax.chain(optax.trace(decay=c.signum_momentum), sign,
                       optax.add_decayed_weights(c.weight_decay, mask=optim.decay_mask),
                       optax.scale_by_learning_rate(schedule))


def get_config(arg: str = "gpt2") -> ml_collections.ConfigDict:
  c = clm_tiny.get_config(arg)
  c.optimizer.kind = "signum"
  c.optimizer.signum_momentum = 0.9  # a field of SignumConfig: --config.optimizer.signum_momentum
  c.optimizer.update(learning_rate=3e-4, weight_decay=0.1)  # sign steps: a small rate
  return c
