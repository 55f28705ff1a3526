"""The one typed description of a Transformer that every layer reads."""

from __future__ import annotations

import dataclasses
from typing import Literal

import jax
import jax.numpy as jnp

from lmjax.errors import check_ranges

Family = Literal["decoder", "encoder"]
DTYPES = ("float32", "bfloat16", "float16", "bfloat16_matmuls")
ATTENTION_IMPLEMENTATIONS = ("reference", "xla", "cudnn", "blockwise", "splash", "auto")
REMAT_POLICIES = ("none", "full", "dots", "dots_no_batch", "save_attention_out")


@dataclasses.dataclass(frozen=True)
class TransformerConfig:
  """Architecture of an encoder (BERT-like) or decoder (GPT-2/LLaMA-like) stack.

  Defaults describe a small GPT-2-style decoder; experiment files override them.
  """

  family: Family = "decoder"  # decoder: causal LM head; encoder: bidirectional, MLM head
  vocab_size: int = 1024
  max_len: int = 1024  # positions the model accepts (learned table size, RoPE bound)
  d_model: int = 256
  num_layers: int = 4
  num_heads: int = 4
  num_kv_heads: int = 0  # 0 = num_heads (MHA); 1 = MQA; in between = GQA
  head_dim: int = 0  # 0 = d_model // num_heads
  d_ff: int = 1024
  mlp: Literal["gelu", "swiglu"] = "gelu"
  activation: Literal["gelu_tanh", "gelu_exact", "silu", "relu"] = "gelu_tanh"
  norm: Literal["layernorm", "rmsnorm"] = "layernorm"
  norm_eps: float = 1e-5
  norm_position: Literal["pre", "post"] = "pre"  # BERT is post-norm
  position: Literal["learned", "rope"] = "learned"
  rope_theta: float = 10000.0
  type_vocab_size: int = 0  # BERT token-type embeddings; 0 = none
  embedding_norm: bool = False  # LayerNorm after the embeddings (BERT)
  use_bias: bool = True  # biases in dense layers and norms
  tie_embeddings: bool = True  # output projection shares the token embedding
  dropout_rate: float = 0.0
  init_std: float = 0.02
  # reference | xla | cudnn | blockwise | splash | auto: splash on TPU, cudnn on GPU in
  # half precision, blockwise elsewhere.
  attention_impl: str = "auto"
  # Compute dtype; parameters stay in param_dtype. bfloat16_matmuls: float32 activations,
  # matmul operands in bfloat16 with float32 sums (CPUs with bfloat16 matmul units, AMX).
  # auto: bfloat16 on GPU and TPU; on a CPU, bfloat16_matmuls where it has AMX bfloat16
  # tiles, else float32 (a fact of the CPU, never a timing: lmjax/cpu_dtype.py).
  dtype: str = "auto"
  param_dtype: str = "float32"
  scan_layers: bool = True  # one compiled layer applied num_layers times
  remat_policy: str = "none"  # what a layer keeps for the backward pass
  # sp: the standard parametrization. mup: µP (Tensor Programs V) relative to a base width:
  # hidden matrices' init std and Adam learning rate shrink with the width multiplier
  # m = d_model / mup_base_d_model (std / sqrt(m), lr / m), attention scores scale as
  # 1/head_dim and the vocabulary head's logits by 1/m, so a learning rate tuned at the base
  # width holds at any width. At the base width mup is sp exactly (docs/scaling.md).
  parametrization: Literal["sp", "mup"] = "sp"
  mup_base_d_model: int = 0  # 0: d_model (this is the base width)

  def __post_init__(self):
    if self.family not in ("decoder", "encoder"):
      raise ValueError(f"model.family must be 'decoder' or 'encoder', got {self.family!r}")
    check_ranges("model", self, positive=("vocab_size", "max_len", "d_model", "num_layers",
                                          "num_heads", "d_ff", "norm_eps", "rope_theta"),
                 non_negative=("num_kv_heads", "head_dim", "type_vocab_size", "init_std"),
                 fractions=("dropout_rate",))
    if self.d_model % self.num_heads and not self.head_dim:
      raise ValueError(
          f"model.d_model={self.d_model} is not divisible by model.num_heads={self.num_heads};"
          " set model.head_dim")
    if self.kv_heads <= 0 or self.num_heads % self.kv_heads:
      raise ValueError(
          f"model.num_heads={self.num_heads} must be a multiple of model.num_kv_heads={self.kv_heads}")
    if self.attention_impl not in ATTENTION_IMPLEMENTATIONS:
      raise ValueError(f"model.attention_impl must be one of {ATTENTION_IMPLEMENTATIONS}")
    if self.remat_policy not in REMAT_POLICIES:
      raise ValueError(f"model.remat_policy must be one of {REMAT_POLICIES}")
    if self.dtype not in ("auto",) + DTYPES:
      raise ValueError(f"model.dtype must be auto, {', '.join(DTYPES)}, got {self.dtype!r}")
    if self.param_dtype not in ("float32", "bfloat16", "float16"):
      raise ValueError("model.param_dtype must be float32, bfloat16 or float16")
    if self.parametrization not in ("sp", "mup"):
      raise ValueError(f"model.parametrization must be 'sp' or 'mup', got {self.parametrization!r}")
    if self.mup_base_d_model < 0:
      raise ValueError(f"model.mup_base_d_model must be >= 0, got {self.mup_base_d_model}")
    if self.parametrization == "mup" and self.d_model % self.mup_base:
      raise ValueError(f"model.d_model={self.d_model} is not a multiple of "
                       f"model.mup_base_d_model={self.mup_base} (µP widens the base width)")

  @property
  def mup_base(self) -> int:
    return self.mup_base_d_model or self.d_model

  @property
  def width_mult(self) -> float:
    """µP's width multiplier d_model / base width (1 under sp)."""
    return self.d_model / self.mup_base if self.parametrization == "mup" else 1.0

  @property
  def query_mult(self) -> float:
    """Scales queries so that attention divides by head_dim rather than sqrt(head_dim),
    relative to the base width's head size (1 under sp). A head grows with the width
    unless `head_dim` is set (then the heads multiply instead and nothing changes)."""
    if self.parametrization != "mup" or self.head_dim:
      return 1.0
    return self.width_mult ** -0.5

  @property
  def kv_heads(self) -> int:
    return self.num_kv_heads or self.num_heads

  @property
  def dim_per_head(self) -> int:
    return self.head_dim or self.d_model // self.num_heads

  @property
  def causal(self) -> bool:
    return self.family == "decoder"

  @property
  def resolved_dtype(self) -> str:
    """`dtype` with `auto` resolved for this process's backend."""
    if self.dtype != "auto":
      return self.dtype
    if jax.default_backend() in ("gpu", "tpu"):
      return "bfloat16"
    from lmjax.cpu_dtype import cpu_auto_dtype  # the CPU's features (cached)
    return cpu_auto_dtype()

  @property
  def compute_dtype(self) -> jnp.dtype:
    """The dtype of activations (and of matmuls, but for bfloat16_matmuls)."""
    name = self.resolved_dtype
    return jnp.dtype(jnp.float32 if name == "bfloat16_matmuls" else name)

  @property
  def matmul_dtype(self) -> jnp.dtype:
    """The dtype of the operands of the dense layers' and vocabulary head's matmuls."""
    name = self.resolved_dtype
    return jnp.dtype(jnp.bfloat16 if name == "bfloat16_matmuls" else name)

  @property
  def weight_dtype(self) -> jnp.dtype:
    return jnp.dtype(self.param_dtype)

  def replace(self, **changes) -> "TransformerConfig":
    return dataclasses.replace(self, **changes)
