"""Fill-mask for encoder (MLM) models: the most likely tokens at each mask."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lmjax.errors import UserError
from lmjax.model import TransformerConfig, build_model

MASK_MARK = "<mask>"


def encode_with_masks(tokenizer: Any, text: str) -> list[int]:
  """[CLS] text [SEP] with every `<mask>` replaced by the mask token id."""
  parts = text.split(MASK_MARK)
  if len(parts) < 2:
    raise UserError(f"the text has no {MASK_MARK}: write e.g. \"To be, or not to {MASK_MARK}\"")
  special = tokenizer.special
  ids = [special.cls]
  for i, part in enumerate(parts):
    if part.strip():
      ids += tokenizer.encode([part.rstrip() if i < len(parts) - 1 else part])[0]
    if i < len(parts) - 1:
      ids.append(special.mask)
  return ids + [special.sep]


def fill_mask(cfg: TransformerConfig, params: Any, tokenizer: Any, text: str, top_k: int = 5
              ) -> list[list[tuple[int, float]]]:
  """For each mask in `text`, the `top_k` (token id, probability) pairs, most likely first."""
  if cfg.family != "encoder":
    raise UserError("fill-mask needs an encoder (MLM) model; use generate for decoders")
  if "output_bias" not in params:
    raise UserError("this model has no MLM head (a BertModel checkpoint?); fill-mask needs "
                    "BertForMaskedLM weights")
  ids = encode_with_masks(tokenizer, text)
  if len(ids) > cfg.max_len:
    raise UserError(f"the text is {len(ids)} tokens; the model takes at most {cfg.max_len}")
  tokens = jnp.asarray([ids], jnp.int32)
  logits = build_model(cfg).apply({"params": params}, tokens)[0]  # (T, V)
  probs = np.asarray(jax.nn.softmax(logits, axis=-1))
  out = []
  for pos in [i for i, t in enumerate(ids) if t == tokenizer.special.mask]:
    best = np.argsort(-probs[pos])[:top_k]
    out.append([(int(t), float(probs[pos, t])) for t in best])
  return out
