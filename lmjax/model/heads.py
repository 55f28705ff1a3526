"""Output heads and the two model families built from the shared block library.

`DecoderLM` (GPT-2 / LLaMA style) predicts the next token; `EncoderMLM` (BERT
style) predicts masked tokens through BERT's transform + tied decoder head.
Both return float32 logits (B, T, V) so losses are computed in full precision.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from lmjax.model.config import TransformerConfig
from lmjax.model.layers import ACTIVATIONS, Norm, dense, zeros_init
from lmjax.model.transformer import Transformer

Array = jax.Array


class LanguageModel(nn.Module):
  """The shared backbone; subclasses add the head: (B, T) ids -> (B, T, V) float32 logits."""

  cfg: TransformerConfig
  deterministic: bool = True
  decode: bool = False  # incremental decoding with a KV cache (see Transformer)

  @nn.compact
  def __call__(self, tokens: Array, segment_ids: Array | None = None,
               positions: Array | None = None, token_types: Array | None = None,
               prefix_len: Array | None = None, predict_at: Array | None = None) -> Array:
    """`predict_at` (B, K): positions to return logits for (MLM targets); default all."""
    backbone = Transformer(self.cfg, self.deterministic, self.decode, name="transformer")
    h = backbone(tokens, segment_ids, positions, token_types, prefix_len)  # (B, T, D)
    if predict_at is not None:
      h = jnp.take_along_axis(h, predict_at[..., None], axis=1)  # (B, K, D)
    logits = self.head(backbone, h).astype(jnp.float32)
    return nn.with_logical_constraint(logits, ("batch", "length", "vocab"))

  def head(self, backbone: Transformer, h: Array) -> Array:
    raise NotImplementedError


class DecoderLM(LanguageModel):
  """Causal Transformer with a (tied or untied) LM head."""

  def head(self, backbone: Transformer, h: Array) -> Array:
    cfg = self.cfg
    if cfg.tie_embeddings:
      return backbone.attend(h)
    return dense(cfg, cfg.vocab_size, 1, ("embed", "vocab"), ("vocab",), "lm_head")(h)


class EncoderMLM(LanguageModel):
  """Bidirectional Transformer with BERT's MLM head (dense, activation, norm, tied decoder)."""

  def head(self, backbone: Transformer, h: Array) -> Array:
    cfg = self.cfg
    h = dense(cfg, cfg.d_model, 1, ("embed", None), (None,), "transform")(h)
    h = Norm(cfg, name="transform_norm")(ACTIVATIONS[cfg.activation](h))
    if cfg.tie_embeddings:
      logits = backbone.attend(h)
    else:
      logits = dense(cfg.replace(use_bias=False), cfg.vocab_size, 1, ("embed", "vocab"), (),
                     "decoder")(h)
    bias = self.param("output_bias", zeros_init(("vocab",)), (cfg.vocab_size,), cfg.weight_dtype)
    return logits.astype(jnp.float32) + bias.astype(jnp.float32)  # (B, T, V)


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
