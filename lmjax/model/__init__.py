"""Flax Linen Transformer blocks and the encoder/decoder model families."""

from lmjax.model.attention import MultiHeadAttention, attention, make_attention_mask
from lmjax.model.config import TransformerConfig
from lmjax.model.heads import (DecoderLM, EncoderMLM, SequenceClassifier, SpanExtractor,
                               build_model)
from lmjax.model.transformer import Block, LayerStack, Transformer, stack_layers, unstack_layers

__all__ = [
    "Block", "DecoderLM", "EncoderMLM", "LayerStack", "MultiHeadAttention", "SequenceClassifier",
    "SpanExtractor", "Transformer",
    "TransformerConfig", "attention", "build_model", "make_attention_mask", "stack_layers",
    "unstack_layers",
]
