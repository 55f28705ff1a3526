"""An objective of your own, written entirely in this file: CLM plus an auxiliary loss.

  python -m launch.train --config experiments/custom_objective.py --workdir runs/custom
  python -m launch.train --config experiments/custom_objective.py --workdir runs/custom \
      --config.objective.penalty=0.3

The auxiliary loss is a confidence penalty (Pereyra et al., 2017, "Regularizing
Neural Networks by Penalizing Confident Output Distributions"): the optimised
objective is the next-token cross-entropy minus `penalty` times the entropy of
each predicted distribution. The logged `loss` stays the plain cross-entropy, so
runs with and without the penalty compare directly; `entropy` is logged beside it.

Nothing in lmjax is edited: the class below subclasses the built-in CLM objective,
adds an option (`objective.penalty`, typed, overridable, a typo is an error) and
registers itself when `launch.train` loads this file. The training loop gives it
everything it gives CLM: sharding, gradient accumulation, non-finite skips,
checkpoints and exact resume.
"""

import dataclasses

import jax
import jax.numpy as jnp
import ml_collections

from lmjax import objectives
from lmjax.data import bundled_corpus
from lmjax.experiment import default_config


@dataclasses.dataclass(frozen=True)
class ConfidencePenaltyConfig(objectives.LMConfig):  # CLM's options, and one more
  kind: str = "clm_confidence_penalty"
  penalty: float = 0.1  # weight of the (negative) entropy of each next-token distribution

  def __post_init__(self):
    super().__post_init__()
    if self.penalty < 0:
      raise ValueError(f"objective.penalty must be >= 0, got {self.penalty}")


@objectives.register("clm_confidence_penalty")
class CLMWithConfidencePenalty(objectives.CLM):
  """CLM's batches and targets (inherited); its loss gains - penalty x entropy."""

  config_class = ConfidencePenaltyConfig

  def loss_sums(self, model, params, batch, rngs):
    logits = model.apply({"params": params}, batch["inputs"], batch["segment_ids"],
                         batch["positions"], rngs=rngs)  # (B, T, V) float32
    sums = objectives.cross_entropy_sums(logits, batch["targets"], batch["weights"],
                                         self.cfg.z_loss, self.cfg.label_smoothing)
    log_p = jax.nn.log_softmax(logits)
    entropy = -jnp.sum(jnp.exp(log_p) * log_p, axis=-1)  # (B, T)
    sums["entropy"] = jnp.sum(entropy * batch["weights"])  # summed like every other term
    sums["objective"] = sums["objective"] - self.cfg.penalty * sums["entropy"]
    return sums

  def metrics(self, sums):
    metrics = super().metrics(sums)
    metrics["entropy"] = sums["entropy"] / jnp.maximum(sums["weight"], 1.0)  # nats per token
    return metrics


def get_config(arg: str = "") -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict(default_config())
  c.model.update(family="decoder", vocab_size=2048, max_len=256, d_model=128, num_layers=4,
                 num_heads=4, d_ff=512, scan_layers=False)
  c.data.update(**bundled_corpus(), seq_len=128)
  c.objective.kind = "clm_confidence_penalty"
  c.objective.penalty = 0.1  # a field of ConfidencePenaltyConfig: --config.objective.penalty
  c.optimizer.update(learning_rate=2e-3, warmup_steps=30, weight_decay=0.1)
  c.train.update(steps=300, batch_size=32, log_every=10, eval_every=100, eval_batches=8,
                 checkpoint_every=100)
  return c
