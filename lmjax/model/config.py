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
NORM_POSITIONS = ("pre", "post", "sandwich", "branch_post")
QK_NORMS = ("none", "head", "projection")
ROPE_SCALINGS = ("none", "linear", "llama3", "yarn")
LAYER_TYPES = ("global", "local")
ROUTERS = ("softmax_topk", "topk_softmax")
DISPATCHES = ("dropless", "capacity")
GROUPED_MATMULS = ("auto", "ragged_dot", "tiled")


@dataclasses.dataclass(frozen=True)
class MoEConfig:
  """`model.moe`: routed (mixture-of-experts) MLPs in place of the dense one. num_experts=0
  (the default) keeps every MLP dense; docs/moe.md describes the layer."""

  num_experts: int = 0  # routed experts per sparse layer; 0: a dense model
  experts_per_token: int = 2  # top-k: the experts each token is sent to
  d_ff: int = 0  # each expert's hidden width; 0: model.d_ff
  # Always-on experts beside the routed ones (DeepSeek, Qwen2-MoE style, ungated): one MLP
  # of width shared_d_ff, or shared_experts x the expert width when shared_d_ff is 0.
  shared_experts: int = 0
  shared_d_ff: int = 0
  # Which layers are sparse: `layers` (0-based indices) if given, else every `every`-th
  # layer, counting from 1 (Qwen's decoder_sparse_step: layer i when (i + 1) % every == 0).
  every: int = 1
  layers: tuple[int, ...] = ()
  # softmax_topk: softmax over all experts, then the k largest (Mixtral, Qwen3-MoE, OLMoE);
  # topk_softmax: the k largest logits, then a softmax over those k (weights sum to 1).
  router: str = "softmax_topk"
  normalize_topk: bool = True  # softmax_topk: rescale the k weights to sum 1 (norm_topk_prob)
  # dropless: every token reaches its k experts (a grouped matmul over tokens sorted by
  # expert); capacity: at most capacity_factor * tokens * k / num_experts tokens per expert
  # and row, the rest pass through the residual (counted), by one-hot dispatch matmuls.
  dispatch: str = "dropless"
  capacity_factor: float = 1.25
  # Dropless dispatch's grouped matmul: ragged_dot (jax.lax.ragged_dot: a tiled kernel on
  # TPU; on CPU, XLA computes every expert on every row), tiled (rows padded to whole tiles
  # per expert, one batched matmul over the tiles), auto: tiled on CPU, else ragged_dot.
  grouped_matmul: str = "auto"
  balance_loss: float = 0.01  # weight of the switch load-balancing loss in the objective
  z_loss: float = 0.001  # weight of the router z-loss (ST-MoE): mean logsumexp(logits)^2

  def __post_init__(self):
    object.__setattr__(self, "layers", tuple(self.layers))  # a JSON list reads back
    check_ranges("model.moe", self, positive=("experts_per_token", "every", "capacity_factor"),
                 non_negative=("num_experts", "d_ff", "shared_experts", "shared_d_ff",
                               "balance_loss", "z_loss"))
    if self.num_experts and self.experts_per_token > self.num_experts:
      raise ValueError(f"model.moe.experts_per_token={self.experts_per_token} exceeds "
                       f"model.moe.num_experts={self.num_experts}")
    for name, allowed in (("router", ROUTERS), ("dispatch", DISPATCHES),
                          ("grouped_matmul", GROUPED_MATMULS)):
      if getattr(self, name) not in allowed:
        raise ValueError(f"model.moe.{name} must be one of {allowed}, got {getattr(self, name)!r}")
    if any(not isinstance(i, int) or i < 0 for i in self.layers):
      raise ValueError(f"model.moe.layers must hold layer indices >= 0, got {self.layers}")

  def replace(self, **changes) -> "MoEConfig":
    return dataclasses.replace(self, **changes)


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
  # gelu: act(x W1) W2 (GPT-2, BERT); swiglu: the gated MLP (act(x Wg) * x Wu) W2 with
  # `activation` as the gate's: silu is SwiGLU (LLaMA), gelu_tanh GeGLU (Gemma).
  mlp: Literal["gelu", "swiglu"] = "gelu"
  activation: Literal["gelu_tanh", "gelu_exact", "silu", "relu"] = "gelu_tanh"
  norm: Literal["layernorm", "rmsnorm"] = "layernorm"
  norm_eps: float = 1e-5
  # Where a block's norms sit. pre: x + f(norm(x)) (GPT-2, LLaMA); post: norm(x + f(x))
  # (BERT); sandwich: x + norm'(f(norm(x))) (Gemma 2, 3); branch_post: x + norm'(f(x))
  # (OLMo 2). f is attention, then the MLP; all but post end with a final norm.
  norm_position: Literal["pre", "post", "sandwich", "branch_post"] = "pre"
  norm_plus_one: bool = False  # RMSNorm scales by (1 + w), w initialised at 0 (Gemma)
  position: Literal["learned", "rope"] = "learned"
  rope_theta: float = 10000.0
  # RoPE scaling for contexts past pretraining's (Hugging Face's `rope_type`; dynamic NTK is
  # not offered: its frequencies would change with each batch's length). linear: positions
  # divided by rope_factor; llama3: Llama 3.1's per-band interpolation; yarn: NTK-by-parts
  # with cos and sin scaled by an attention factor.
  rope_scaling: Literal["none", "linear", "llama3", "yarn"] = "none"
  rope_factor: float = 1.0  # linear, llama3, yarn: how much longer the context becomes
  rope_original_max_len: int = 0  # llama3, yarn: pretraining's context length
  rope_low_freq_factor: float = 1.0  # llama3: wavelengths past original/low are scaled fully
  rope_high_freq_factor: float = 4.0  # llama3: wavelengths under original/high are kept
  rope_beta_fast: float = 32.0  # yarn: rotations under which a dimension is interpolated
  rope_beta_slow: float = 1.0  # yarn: rotations over which a dimension is kept
  rope_attention_factor: float = 0.0  # yarn: cos and sin times this; 0: 0.1 ln(factor) + 1
  rope_truncate: bool = True  # yarn: round the correction range to whole dimensions
  rope_local_theta: float = 0.0  # local layers' own base, unscaled (Gemma 3); 0: as global
  # Sliding-window attention: a query on a local layer sees itself and the sliding_window - 1
  # tokens before it (Hugging Face's `sliding_window`); 0: every layer is global.
  sliding_window: int = 0
  # "global" or "local" per layer, repeated over the stack: ("local",) * 5 + ("global",) is
  # Gemma 3's pattern, ("local", "global") Gemma 2's. (): every layer local when
  # sliding_window is set (Mistral), else global.
  layer_types: tuple[str, ...] = ()
  qkv_bias: bool = False  # biases on the query, key and value projections (Qwen2), use_bias or not
  # Norm of queries and keys before RoPE: over each head (Qwen3, Gemma 3) or over the whole
  # projection, all heads at once (OLMo 2); the norm is `norm`, with norm_plus_one.
  qk_norm: Literal["none", "head", "projection"] = "none"
  # Scores are divided by sqrt(this); 0: head_dim (Gemma's query_pre_attn_scalar).
  attn_scale_dim: float = 0.0
  attn_softcap: float = 0.0  # scores -> c tanh(scores / c) before the softmax; 0: off (Gemma 2)
  final_softcap: float = 0.0  # logits -> c tanh(logits / c); 0: off (Gemma 2)
  embed_scale: bool = False  # token embeddings times sqrt(d_model) (Gemma)
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
  moe: MoEConfig = MoEConfig()  # routed MLPs (mixture of experts); dense by default

  def __post_init__(self):
    object.__setattr__(self, "layer_types", tuple(self.layer_types))  # a JSON list reads back
    if isinstance(self.moe, dict):  # a saved config's JSON
      object.__setattr__(self, "moe", MoEConfig(**self.moe))
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
    self._check_variants()
    self._check_rope()
    self._check_moe()

  def _check_variants(self) -> None:
    """The options of today's families (Qwen, Mistral, Gemma, OLMo 2)."""
    for name, allowed in (("norm_position", NORM_POSITIONS), ("qk_norm", QK_NORMS)):
      if getattr(self, name) not in allowed:
        raise ValueError(f"model.{name} must be one of {allowed}, got {getattr(self, name)!r}")
    check_ranges("model", self, non_negative=("sliding_window", "attn_scale_dim", "attn_softcap",
                                              "final_softcap"))
    if self.norm_plus_one and self.norm != "rmsnorm":
      raise ValueError("model.norm_plus_one scales an RMSNorm by (1 + w): it needs "
                       "model.norm='rmsnorm'")
    if self.norm_position == "post" and self.qk_norm != "none":
      raise ValueError("model.qk_norm is for pre-norm, sandwich and branch_post blocks")
    bad = [t for t in self.layer_types if t not in LAYER_TYPES]
    if bad:
      raise ValueError(f"model.layer_types holds {bad[0]!r}; each must be 'global' or 'local'")
    if len(self.layer_types) > self.num_layers:
      raise ValueError(f"model.layer_types names {len(self.layer_types)} layers, more than "
                       f"model.num_layers={self.num_layers}")
    if "local" in self.layer_types and not self.sliding_window:
      raise ValueError("model.layer_types has local layers but model.sliding_window is 0")
    if self.sliding_window and not self.causal:
      raise ValueError("model.sliding_window is for causal decoders (model.family='decoder')")

  def _check_rope(self) -> None:
    if self.rope_scaling == "dynamic":
      raise ValueError("model.rope_scaling='dynamic' (dynamic NTK) is not implemented: its "
                       "frequencies change with each batch's length; use yarn or linear")
    if self.rope_scaling not in ROPE_SCALINGS:
      raise ValueError(f"model.rope_scaling must be one of {ROPE_SCALINGS}, "
                       f"got {self.rope_scaling!r}")
    check_ranges("model", self, positive=("rope_factor",),
                 non_negative=("rope_original_max_len", "rope_attention_factor",
                               "rope_local_theta"))
    if self.position != "rope" and (self.rope_scaling != "none" or self.rope_local_theta):
      raise ValueError("model.rope_scaling and model.rope_local_theta need model.position='rope'")
    if self.rope_scaling in ("llama3", "yarn") and not self.rope_original_max_len:
      raise ValueError(f"model.rope_scaling={self.rope_scaling} needs "
                       "model.rope_original_max_len (the pretraining context length)")
    if self.rope_scaling == "llama3" and self.rope_high_freq_factor <= self.rope_low_freq_factor:
      raise ValueError("model.rope_high_freq_factor must exceed model.rope_low_freq_factor")

  def _check_moe(self) -> None:
    bad = [i for i in self.moe.layers if i >= self.num_layers]
    if self.moe.num_experts and bad:
      raise ValueError(f"model.moe.layers names layer {bad[0]}; the model has "
                       f"model.num_layers={self.num_layers}")
    if self.scan_layers and len(set(self.sparse_layers)) > 1:
      raise ValueError("model.moe: a stack mixing dense and sparse layers is unrolled; set "
                       "model.scan_layers=False (or make every layer sparse)")

  @property
  def sparse_layers(self) -> tuple[bool, ...]:
    """Whether each layer's MLP is routed (model.moe), or dense."""
    m = self.moe
    if not m.num_experts:
      return (False,) * self.num_layers
    if m.layers:
      return tuple(i in m.layers for i in range(self.num_layers))
    return tuple((i + 1) % m.every == 0 for i in range(self.num_layers))

  @property
  def expert_d_ff(self) -> int:
    return self.moe.d_ff or self.d_ff

  @property
  def shared_d_ff(self) -> int:
    """The width of the always-on shared experts' MLP (0: none)."""
    return self.moe.shared_d_ff or self.moe.shared_experts * self.expert_d_ff

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
  def local_layers(self) -> tuple[bool, ...]:
    """Whether each layer attends within the sliding window (True) or to every earlier token."""
    if not self.sliding_window:
      return (False,) * self.num_layers
    types = self.layer_types or ("local",)
    return tuple(types[i % len(types)] == "local" for i in range(self.num_layers))

  @property
  def uniform_layers(self) -> bool | None:
    """True or False when every layer is local, or every one global; None when they mix
    (then a scanned stack reads each layer's kind as data)."""
    kinds = set(self.local_layers)
    return kinds.pop() if len(kinds) == 1 else None

  @property
  def attention_scale(self) -> float | None:
    """The scores' scale when it is not 1/sqrt(head_dim) (attn_scale_dim), else None."""
    return self.attn_scale_dim ** -0.5 if self.attn_scale_dim else None

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
