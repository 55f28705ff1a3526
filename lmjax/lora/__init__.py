"""LoRA and QLoRA: low-rank adapters trained on a frozen (optionally quantized) base.

`LoraSpec` is what a run's steps need: the config, the dense layers that get
adapters, and which parameters train (the adapters, and a new task head in full).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax

from lmjax.lora import quant
from lmjax.lora.adapters import (DenseInfo, LoraModel, add_adapters, checksum, combine, fit,
                                 dense_layers, is_adapter, merged, select, targeted,
                                 without_adapters)
from lmjax.lora.config import LoraConfig

__all__ = ["LoraConfig", "LoraSpec", "LoraModel", "checksum", "combine", "fit", "merged", "select",
           "without_adapters", "is_adapter", "dense_layers"]


@dataclasses.dataclass(frozen=True)
class LoraSpec:
  cfg: LoraConfig
  targets: dict[str, DenseInfo]  # the dense layers with adapters
  dense: dict[str, DenseInfo]  # every dense layer of the base (quantized under QLoRA)
  is_new: Callable[[str], bool]  # a new task head: trained in full

  def trainable(self, name: str) -> bool:
    return is_adapter(name) or self.is_new(name)

  def frozen_dense(self) -> dict[str, DenseInfo]:
    return {k: v for k, v in self.dense.items() if not self.is_new(k + "/kernel")}

  def prepare(self, params: dict[str, Any], rng: jax.Array) -> dict[str, Any]:
    """A model's parameters (boxed or not) with fresh adapters, the base quantized as
    `base_dtype` says."""
    params = add_adapters(params, self.targets, self.cfg.rank, rng)
    return self.quantize(params)

  def quantize(self, params: dict[str, Any]) -> dict[str, Any]:
    if self.cfg.base_dtype == "float":
      return params
    return quant.quantize_tree(params, self.frozen_dense(), self.cfg.base_dtype)

  def wrap(self, module: Any, train: bool) -> LoraModel:
    return LoraModel(module, self.cfg.scale, self.cfg.dropout if train else 0.0)


def make_spec(cfg: LoraConfig, module: Any, seq_len: int, is_new: Callable[[str], bool]
              ) -> LoraSpec:
  """The spec of `module` (its dense layers traced on a (1, seq_len) batch)."""
  import jax.numpy as jnp
  dummy = jnp.zeros((1, seq_len), jnp.int32)
  dense = dense_layers(module, dummy, jnp.ones_like(dummy))
  return LoraSpec(cfg, targeted(cfg, dense, is_new), dense, is_new)
