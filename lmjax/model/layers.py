"""Building blocks: dense layers, norms, MLPs and embeddings.

Every parameter is created through `nn.with_logical_partitioning`, naming its
axes with the logical names of `lmjax.sharding` (embed, heads, kv, mlp, vocab,
...). The mapping to mesh axes lives in one rules table in the config.
"""

from __future__ import annotations

import math
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from lmjax.model.config import TransformerConfig
from lmjax.model.precision import mixed_matmul

Array = jax.Array
ACTIVATIONS = {
    "gelu_tanh": lambda x: jax.nn.gelu(x, approximate=True),  # GPT-2 "gelu_new"
    "gelu_exact": lambda x: jax.nn.gelu(x, approximate=False),  # BERT
    "silu": jax.nn.silu,
    "relu": jax.nn.relu,
}


def normal_init(std: float, names: Sequence[str | None]):
  return nn.with_logical_partitioning(nn.initializers.normal(std), tuple(names))


def zeros_init(names: Sequence[str | None]):
  return nn.with_logical_partitioning(nn.initializers.zeros_init(), tuple(names))


class Dense(nn.Module):
  """x @ kernel (+ bias) over the last `len(in_axes)` axes of x; kernel (*in, *out).

  Unlike nn.DenseGeneral it initialises the kernel in its final shape, so the
  logical axis names always match the kernel's rank.
  """

  features: tuple[int, ...]
  num_in: int
  kernel_names: tuple[str | None, ...]
  bias_names: tuple[str | None, ...]
  use_bias: bool
  dtype: jnp.dtype
  param_dtype: jnp.dtype
  std: float
  matmul_dtype: jnp.dtype | None = None  # operands only, float32 sums (bfloat16_matmuls)

  @nn.compact
  def __call__(self, x: Array) -> Array:
    in_shape = x.shape[x.ndim - self.num_in:]
    kernel = self.param("kernel", normal_init(self.std, self.kernel_names),
                        (*in_shape, *self.features), self.param_dtype)
    # One 2-D matmul on row-major views (free reshapes): a dot_general over several
    # kernel axes makes XLA transpose the weight gradient and copy it back, every step.
    batch_shape = x.shape[:x.ndim - self.num_in]
    x2 = x.reshape(-1, math.prod(in_shape)).astype(self.dtype)
    kernel = kernel.reshape(x2.shape[1], -1)
    if self.matmul_dtype is not None and self.matmul_dtype != self.dtype:
      y = mixed_matmul(x2, kernel, self.matmul_dtype).astype(self.dtype)
    else:
      y = x2 @ kernel.astype(self.dtype)
    y = y.reshape(*batch_shape, *self.features)
    if self.use_bias:
      bias = self.param("bias", zeros_init(self.bias_names), self.features, self.param_dtype)
      y = y + bias.astype(self.dtype)
    return y


# Layers whose kernels are hidden matrices (both sides grow with the width): µP shrinks
# their init std by sqrt(m) here and their Adam learning rate by m (optim.mup_lr_scale).
HIDDEN = ("query", "key", "value", "out", "wi", "wo", "gate", "up", "transform")


def dense(cfg: TransformerConfig, features, num_in: int, kernel_names, bias_names, name: str,
          std: float | None = None, bias: bool | None = None) -> Dense:
  """A Dense layer configured from `cfg` (dtypes, bias unless `bias` says, init scale)."""
  features = tuple(features) if isinstance(features, (tuple, list)) else (features,)
  std = cfg.init_std if std is None else std
  if name in HIDDEN:
    std /= cfg.width_mult ** 0.5
  bias = cfg.use_bias if bias is None else bias
  return Dense(features, num_in, tuple(kernel_names), tuple(bias_names), bias,
               cfg.compute_dtype, cfg.weight_dtype, std, cfg.matmul_dtype, name=name)


class Norm(nn.Module):
  """LayerNorm or RMSNorm over the last axis; statistics in float32. Its scale is named
  `axis` for sharding (the model width; the query/key norms name theirs)."""

  cfg: TransformerConfig
  axis: str | None = "embed"

  @nn.compact
  def __call__(self, x: Array) -> Array:
    cfg = self.cfg
    if cfg.norm_plus_one:
      return PlusOneRMSNorm(cfg, self.axis, name="norm")(x)
    ones = nn.with_logical_partitioning(nn.initializers.ones_init(), (self.axis,))
    if cfg.norm == "rmsnorm":
      return nn.RMSNorm(epsilon=cfg.norm_eps, dtype=cfg.compute_dtype,
                        param_dtype=cfg.weight_dtype, scale_init=ones, name="norm")(x)
    return nn.LayerNorm(epsilon=cfg.norm_eps, use_bias=cfg.use_bias, dtype=cfg.compute_dtype,
                        param_dtype=cfg.weight_dtype, scale_init=ones,
                        bias_init=zeros_init((self.axis,)), name="norm")(x)


class PlusOneRMSNorm(nn.Module):
  """Gemma's RMSNorm: x / rms(x) * (1 + w), w initialised at 0, all in float32 and then
  cast (transformers' Gemma2RMSNorm: `(x * w).to(dtype)`, not Llama's `x.to(dtype) * w`)."""

  cfg: TransformerConfig
  axis: str | None

  @nn.compact
  def __call__(self, x: Array) -> Array:
    cfg = self.cfg
    w = self.param("scale", zeros_init((self.axis,)), (x.shape[-1],), cfg.weight_dtype)
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + cfg.norm_eps)
    return (y * (1.0 + w.astype(jnp.float32))).astype(cfg.compute_dtype)


class Mlp(nn.Module):
  """GELU MLP (GPT-2, BERT) or gated (SwiGLU: LLaMA; GeGLU: Gemma): (B, T, D) -> (B, T, D)."""

  cfg: TransformerConfig
  deterministic: bool = True

  @nn.compact
  def __call__(self, x: Array) -> Array:
    cfg = self.cfg
    act = ACTIVATIONS[cfg.activation]
    up = lambda name: dense(cfg, cfg.d_ff, 1, ("embed", "mlp"), ("mlp",), name)
    if cfg.mlp == "swiglu":
      h = act(up("gate")(x)) * up("up")(x)  # (B, T, F)
    else:
      h = act(up("wi")(x))  # (B, T, F)
    h = nn.with_logical_constraint(h, ("batch", "length", "mlp"))
    std = cfg.init_std / (2 * cfg.num_layers) ** 0.5  # GPT-2's depth-scaled residual init
    y = dense(cfg, cfg.d_model, 1, ("mlp", "embed"), ("embed",), "wo", std)(h)  # (B, T, D)
    return nn.Dropout(cfg.dropout_rate)(y, deterministic=self.deterministic)


class Embeddings(nn.Module):
  """Token (+ learned position, + token type) embeddings: (B, T) ids -> (B, T, D)."""

  cfg: TransformerConfig
  deterministic: bool = True

  def setup(self):
    cfg = self.cfg
    self.tokens = nn.Embed(cfg.vocab_size, cfg.d_model, dtype=cfg.compute_dtype,
                           param_dtype=cfg.weight_dtype,
                           embedding_init=normal_init(cfg.init_std, ("vocab", "embed")))
    if cfg.position == "learned":
      self.positions = nn.Embed(cfg.max_len, cfg.d_model, dtype=cfg.compute_dtype,
                                param_dtype=cfg.weight_dtype,
                                embedding_init=normal_init(cfg.init_std, (None, "embed")))
    if cfg.type_vocab_size:
      self.token_types = nn.Embed(cfg.type_vocab_size, cfg.d_model, dtype=cfg.compute_dtype,
                                  param_dtype=cfg.weight_dtype,
                                  embedding_init=normal_init(cfg.init_std, (None, "embed")))
    if cfg.embedding_norm:
      self.norm = Norm(cfg)
    self.dropout = nn.Dropout(cfg.dropout_rate)

  def __call__(self, tokens: Array, positions: Array, token_types: Array | None) -> Array:
    x = self.tokens(tokens)  # (B, T, D)
    if self.cfg.embed_scale:  # Gemma: sqrt(d) rounded to the embedding's dtype first
      x = x * jnp.asarray(self.cfg.d_model ** 0.5, self.cfg.weight_dtype).astype(x.dtype)
    if self.cfg.position == "learned":
      x = x + self.positions(positions)
    if self.cfg.type_vocab_size:
      x = x + self.token_types(jnp.zeros_like(tokens) if token_types is None else token_types)
    if self.cfg.embedding_norm:
      x = self.norm(x)
    x = self.dropout(x, deterministic=self.deterministic)
    return nn.with_logical_constraint(x, ("batch", "length", "embed"))
