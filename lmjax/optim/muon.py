"""Muon: Newton-Schulz orthogonalised momentum for the hidden matrices, AdamW for the rest.

Built on optax's `optax.contrib.scale_by_muon` (Nesterov momentum and the quintic
Newton-Schulz iteration, vmapped over batch axes) inside lmjax's own partition, rather than `optax.contrib.muon` itself, whose
Adam half is NAdam whenever Muon's momentum is Nesterov, decays every non-matrix
parameter alike (norms and biases too) and cannot tell a stack of layers from a
matrix without a per-parameter spec. Here:

- Muon takes the kernels of the hidden layers (`model.layers.HIDDEN`: attention
  query/key/value/out, MLP in/out/gate/up, the MLM head's transform). Their logical
  axis names say which axes form the matrix: the `embed` axis is the input of a
  projection out of the residual stream (query: embed -> heads x kv) and the output of
  one into it (out: heads x kv -> embed). A leading `layers` axis (a scanned stack) is
  a batch axis: each layer's matrix is orthogonalised on its own.
- AdamW (lmjax's, with its decay mask and b1/b2/eps) takes embeddings, norms, biases,
  the vocabulary head and task heads.
- One learning rate and weight decay serve both: with `muon_rms_scale` 0.2 the
  orthogonalised update is scaled by 0.2 sqrt(max(fan_in, fan_out)), AdamW's typical
  RMS (Liu et al. 2025, "Muon is Scalable for LLM Training").

Under fsdp or tensor sharding the Newton-Schulz chain is a few matmuls on the sharded
matrix, which XLA partitions like any other (a test holds the sharded update to the
unsharded one).
"""

from __future__ import annotations

import math
from typing import Any, Callable

import flax.linen as nn
import jax
import optax
from optax.contrib import MuonDimensionNumbers, scale_by_muon

from lmjax.optim.base import Optimizer, decay_mask, leaf_names, register

BATCH_AXES = ("layers",)  # a stack of independent matrices (scanned layers)


def muon_dims(names: tuple[str | None, ...]) -> MuonDimensionNumbers:
  """Which axes of a hidden kernel form its matrix's input (reduction) and output."""
  matrix = [i for i, n in enumerate(names) if n not in BATCH_AXES]
  if names[matrix[-1]] == "embed" and names[matrix[0]] != "embed":  # into the residual stream
    return MuonDimensionNumbers(tuple(matrix[:-1]), (matrix[-1],))
  return MuonDimensionNumbers((matrix[0],), tuple(matrix[1:]))


def muon_specs(axes: Any) -> dict[tuple[str, ...], MuonDimensionNumbers]:
  """{parameter path: its dimension numbers} for the parameters Muon updates, from a tree
  of logical axis names (`Optimizer.param_axes`)."""
  from lmjax.model.layers import HIDDEN
  specs = {}

  def visit(path, names):
    keys = leaf_names(path)
    if len(keys) >= 2 and keys[-1] == "kernel" and keys[-2] in HIDDEN:
      specs[tuple(keys)] = muon_dims(names)
  jax.tree_util.tree_map_with_path(visit, axes, is_leaf=lambda x: isinstance(x, tuple))
  return specs


def scale_by_fan(dims: Callable[[Any], Any], rms_scale: float) -> optax.GradientTransformation:
  """An orthogonalised update (singular values near 1) rescaled by its matrix's shape:
  rms_scale x sqrt(max(fan_in, fan_out)) (an RMS of about `rms_scale`, AdamW's), or with
  rms_scale 0, Jordan's sqrt(max(1, fan_out / fan_in))."""
  def scale(update, d):
    fan_in = math.prod(update.shape[a] for a in d.reduction_axis)
    fan_out = math.prod(update.shape[a] for a in d.output_axis)
    factor = rms_scale * math.sqrt(max(fan_in, fan_out)) if rms_scale else \
        math.sqrt(max(1.0, fan_out / fan_in))
    return update * factor

  def update(updates, state, params=None):
    del params
    return jax.tree.map(scale, updates, dims(updates)), state
  return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


@register("muon")
class Muon(Optimizer):
  elementwise = False  # µP's Adam rule does not apply; `muon_rms_scale` sets the scale

  def transform(self, schedule):
    c = self.cfg
    specs = muon_specs(self.param_axes())
    is_box = lambda x: isinstance(x, nn.meta.AxisMetadata)  # a whole boxed parameter
    labels = lambda params: jax.tree_util.tree_map_with_path(
        lambda path, _: "muon" if tuple(leaf_names(path)) in specs else "adam", params,
        is_leaf=is_box)

    def dims(updates):  # the Muon half's tree: its parameters' specs, masked nodes kept
      return jax.tree_util.tree_map_with_path(lambda path, _: specs[tuple(leaf_names(path))],
                                              updates)
    matrices = optax.chain(
        scale_by_muon(ns_steps=c.muon_ns_steps, beta=c.muon_momentum, nesterov=c.muon_nesterov,
                      weight_dimension_numbers=dims),
        scale_by_fan(dims, c.muon_rms_scale),
        optax.add_decayed_weights(c.weight_decay),
        optax.scale_by_learning_rate(schedule))
    rest = optax.adamw(schedule, b1=c.b1, b2=c.b2, eps=c.eps, weight_decay=c.weight_decay,
                       mask=decay_mask)
    return optax.partition({"muon": matrices, "adam": rest}, labels)
