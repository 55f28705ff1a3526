"""Elementwise optimizers: AdamW (lmjax's default, unchanged), Lion and Adafactor.

Weight decay means the same in each: decoupled, multiplied by the learning rate
(PyTorch's and optax's AdamW convention), on kernels and embeddings only
(`decay_mask`).
"""

from __future__ import annotations

import optax

from lmjax.optim.base import Optimizer, decay_mask, register
from lmjax.sharding import unbox


@register("adamw")
class AdamW(Optimizer):
  """optax.adamw: the optimizer state lmjax has always had (checkpoints of earlier
  releases resume into it)."""

  def transform(self, schedule):
    c = self.cfg
    return optax.adamw(schedule, b1=c.b1, b2=c.b2, eps=c.eps, weight_decay=c.weight_decay,
                       mask=decay_mask)


@register("adafactor")
class Adafactor(Optimizer):
  """Adafactor (Shazeer and Stern 2018), t5x's default: second moments of a matrix kept
  as row and column means (its two largest axes), no first moment, updates clipped to
  block RMS 1 and, with `adafactor_parameter_scale`, scaled by each parameter block's
  RMS. optax's own chain, except that weight decay is multiplied by the learning rate
  here (optax's adafactor subtracts `weight_decay_rate x param` at every step)."""

  def transform(self, schedule):
    c = self.cfg
    parts = [optax.scale_by_factored_rms(decay_rate=c.adafactor_decay_rate,
                                         min_dim_size_to_factor=c.adafactor_min_dim,
                                         epsilon=1e-30),
             optax.clip_by_block_rms(1.0)]
    if c.adafactor_parameter_scale:
      parts.append(optax.scale_by_param_block_rms())
    parts += [optax.add_decayed_weights(c.weight_decay, mask=decay_mask),
              optax.scale_by_learning_rate(schedule)]
    tx = optax.chain(*parts)
    # Factored moments drop an axis, so a parameter's logical axis names do not fit them:
    # the state is built unboxed, and replicated (row and column means are small).
    return optax.GradientTransformation(lambda params: tx.init(unbox(params)), tx.update)


@register("lion")
class Lion(Optimizer):
  """Lion (Chen et al. 2023, "Symbolic Discovery of Optimization Algorithms"): the sign
  of an interpolated momentum; one moment, so half AdamW's state. Its paper pairs it
  with b2=0.99, a learning rate 3-10x below AdamW's and weight decay as much above."""

  def transform(self, schedule):
    c = self.cfg
    return optax.lion(schedule, b1=c.b1, b2=c.b2, weight_decay=c.weight_decay, mask=decay_mask)
