"""Output heads and the two model families built from the shared block library.

`DecoderLM` (GPT-2 / LLaMA style) predicts the next token; `EncoderMLM` (BERT
style) predicts masked tokens through BERT's transform + tied decoder head.
Both return float32 logits (B, T, V) so losses are computed in full precision, or,
with `project=False`, the head's `Projection` (features and weights) for a loss that
fuses the vocabulary matmul.
"""

from __future__ import annotations

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp

from lmjax.model.config import TransformerConfig
from lmjax.model.layers import ACTIVATIONS, Norm, dense, normal_init, zeros_init
from lmjax.model.transformer import Transformer

Array = jax.Array


@flax.struct.dataclass
class Projection:
  """A vocabulary head before its last matmul: what a loss that fuses the projection
  (`objectives.fused_cross_entropy_sums`) takes instead of logits."""

  features: Array  # (B, L, D), compute dtype
  weight: Array  # (V, D) if vocab_first (a tied embedding) else (D, V)
  bias: Array | None  # (V,)
  vocab_first: bool = flax.struct.field(pytree_node=False)
  matmul_dtype: jnp.dtype = flax.struct.field(pytree_node=False, default=None)  # operands
  softcap: float = flax.struct.field(pytree_node=False, default=0.0)  # c tanh(logits / c)

  def logits(self) -> Array:
    """features @ W + bias (soft-capped if `softcap`): (B, L, V) float32."""
    h, dtype = self.features, self.matmul_dtype or self.features.dtype
    contract = ((h.ndim - 1,), (1 if self.vocab_first else 0,))
    logits = jax.lax.dot_general(h.astype(dtype), self.weight.astype(dtype),
                                 (contract, ((), ())), preferred_element_type=jnp.float32)
    logits = logits if self.bias is None else logits + self.bias.astype(jnp.float32)
    return self.softcap * jnp.tanh(logits / self.softcap) if self.softcap else logits


class VocabKernel(nn.Module):
  """An untied vocabulary projection's parameters (kernel (D, V), optional bias), kept
  whole so a fused loss can take them; applied through `Projection`."""

  cfg: TransformerConfig
  use_bias: bool

  def setup(self):
    cfg = self.cfg
    self.kernel = self.param("kernel", normal_init(cfg.init_std, ("embed", "vocab")),
                             (cfg.d_model, cfg.vocab_size), cfg.weight_dtype)
    self.bias = (self.param("bias", zeros_init(("vocab",)), (cfg.vocab_size,), cfg.weight_dtype)
                 if self.use_bias else None)

  def __call__(self, h: Array) -> Projection:
    return Projection(h, self.kernel, self.bias, False, self.cfg.matmul_dtype)


class LanguageModel(nn.Module):
  """The shared backbone; subclasses add the head: (B, T) ids -> (B, T, V) float32 logits."""

  cfg: TransformerConfig
  deterministic: bool = True
  decode: bool = False  # incremental decoding with a KV cache (see Transformer)

  @nn.compact
  def __call__(self, tokens: Array, segment_ids: Array | None = None,
               positions: Array | None = None, token_types: Array | None = None,
               prefix_len: Array | None = None, predict_at: Array | None = None,
               project: bool = True) -> Array | Projection:
    """`predict_at` (B, K): positions to return logits for (MLM targets); default all.
    `project=False` returns the head's `Projection` instead of logits."""
    backbone = Transformer(self.cfg, self.deterministic, self.decode, name="transformer")
    h = backbone(tokens, segment_ids, positions, token_types, prefix_len)  # (B, T, D)
    if predict_at is not None:
      h = jnp.take_along_axis(h, predict_at[..., None], axis=1)  # (B, K, D)
    head = self.head(backbone, h)
    if not project:
      return head  # a fused loss applies its soft-cap (`Projection.softcap`) itself
    return nn.with_logical_constraint(head.logits(), ("batch", "length", "vocab"))

  def head(self, backbone: Transformer, h: Array) -> Projection:
    raise NotImplementedError


def readout_features(cfg: TransformerConfig, h: Array) -> Array:
  """The features the vocabulary head reads; µP divides its logits by the width multiplier
  (the head's weights, tied or not, keep their init and learning rate)."""
  return h if cfg.width_mult == 1.0 else h * jnp.asarray(1.0 / cfg.width_mult, h.dtype)


class DecoderLM(LanguageModel):
  """Causal Transformer with a (tied or untied) LM head."""

  def head(self, backbone: Transformer, h: Array) -> Projection:
    h = readout_features(self.cfg, h)
    if self.cfg.tie_embeddings:
      return Projection(h, backbone.embedding_table(), None, True, self.cfg.matmul_dtype,
                        self.cfg.final_softcap)
    head = VocabKernel(self.cfg, self.cfg.use_bias, name="lm_head")(h)
    return head.replace(softcap=self.cfg.final_softcap)


class EncoderMLM(LanguageModel):
  """Bidirectional Transformer with BERT's MLM head (dense, activation, norm, tied decoder)."""

  def head(self, backbone: Transformer, h: Array) -> Projection:
    cfg = self.cfg
    h = dense(cfg, cfg.d_model, 1, ("embed", None), (None,), "transform")(h)
    h = readout_features(cfg, Norm(cfg, name="transform_norm")(ACTIVATIONS[cfg.activation](h)))
    bias = self.param("output_bias", zeros_init(("vocab",)), (cfg.vocab_size,), cfg.weight_dtype)
    if cfg.tie_embeddings:
      return Projection(h, backbone.embedding_table(), bias, True, cfg.matmul_dtype)
    return Projection(h, VocabKernel(cfg, False, name="decoder").kernel, bias, False,
                      cfg.matmul_dtype)


class SequenceClassifier(nn.Module):
  """Backbone + one label distribution per sequence: (B, T) ids -> (B, num_labels).

  Encoders pool the first token ([CLS]); decoders the last real token, the only
  one that has seen the whole sequence.
  """

  cfg: TransformerConfig
  num_labels: int
  deterministic: bool = True

  @nn.compact
  def __call__(self, tokens: Array, segment_ids: Array, token_types: Array | None = None
               ) -> Array:
    h = Transformer(self.cfg, self.deterministic, name="transformer")(
        tokens, segment_ids, token_types=token_types)  # (B, T, D)
    if self.cfg.causal:
      last = jnp.maximum(jnp.sum(segment_ids != 0, axis=1) - 1, 0)  # (B,)
      pooled = jnp.take_along_axis(h, last[:, None, None], axis=1)[:, 0]
    else:
      pooled = h[:, 0]  # (B, D)
    pooled = nn.Dropout(self.cfg.dropout_rate)(pooled, deterministic=self.deterministic)
    logits = dense(self.cfg, self.num_labels, 1, ("embed", None), (None,), "classifier")(pooled)
    return logits.astype(jnp.float32)


class SpanExtractor(nn.Module):
  """Backbone + start/end scores per token for extractive QA: (B, T) -> 2 x (B, T)."""

  cfg: TransformerConfig
  deterministic: bool = True

  @nn.compact
  def __call__(self, tokens: Array, segment_ids: Array, token_types: Array | None = None
               ) -> tuple[Array, Array]:
    h = Transformer(self.cfg, self.deterministic, name="transformer")(
        tokens, segment_ids, token_types=token_types)  # (B, T, D)
    scores = dense(self.cfg, 2, 1, ("embed", None), (None,), "span")(h).astype(jnp.float32)
    scores = jnp.where((segment_ids != 0)[..., None], scores, -1e9)  # never a padding token
    return scores[..., 0], scores[..., 1]  # (B, T) start, end


def build_model(cfg: TransformerConfig, deterministic: bool = True,
                decode: bool = False) -> nn.Module:
  """The model family named by `cfg.family` (`decode`: with a KV cache, decoders only)."""
  return (DecoderLM if cfg.family == "decoder" else EncoderMLM)(cfg, deterministic, decode)
