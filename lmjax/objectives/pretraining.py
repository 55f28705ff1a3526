"""Pretraining objectives: causal (CLM) and masked (MLM) language modelling on packed rows."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax

from lmjax.objectives.base import Batch, Objective, ObjectiveConfig, register
from lmjax.objectives.losses import (clm_targets, cross_entropy_sums, fused_cross_entropy_sums,
                                     max_predictions, mlm_mask)

Array = jax.Array


class LanguageModelling(Objective):
  """Cross-entropy of a vocabulary head at the positions `prepare` picks, on rows packed
  from a corpus (token stores or text files, `data.train_files`)."""

  frame = "clm"  # the ids around each document: clm [bos] .. [eos], mlm [cls] .. [sep]

  def datasets(self, data: Any, tokenizer: Any, model: Any, seed: int):
    from lmjax.data.pipeline import build_datasets
    return build_datasets(data, tokenizer, self.frame, seed)

  def loss_sums(self, model: nn.Module, params: Any, batch: Batch,
                rngs: dict[str, Array]) -> dict[str, Array]:
    cfg = self.cfg
    fused = cfg.use_fused_head()
    out = model.apply({"params": params}, batch["inputs"], batch["segment_ids"],
                      batch["positions"], predict_at=batch.get("predict_at"), project=not fused,
                      rngs=rngs)
    if fused:  # out: the head's Projection; no (B, T, V) logits are built
      return fused_cross_entropy_sums(
          out.features, out.weight, out.bias, batch["targets"], batch["weights"],
          out.vocab_first, cfg.z_loss, cfg.label_smoothing, matmul_dtype=out.matmul_dtype)
    return cross_entropy_sums(out, batch["targets"], batch["weights"],  # (B, T or K, V)
                              cfg.z_loss, cfg.label_smoothing)


@register("clm")
class CLM(LanguageModelling):
  """Next-token prediction within each packed document."""

  def prepare(self, batch: Batch, rng: Array) -> Batch:
    targets, weights = clm_targets(batch["tokens"], batch["segment_ids"])
    return {"inputs": batch["tokens"], "segment_ids": batch["segment_ids"],
            "positions": batch["positions"], "targets": targets, "weights": weights}


@register("mlm")
class MLM(LanguageModelling):
  """BERT's masked tokens: the head runs on the K selected positions only."""

  frame = "mlm"

  def prepare(self, batch: Batch, rng: Array) -> Batch:
    inputs, predict_at, targets, weights = mlm_mask(  # predict_at, targets, weights: (B, K)
        rng, batch["tokens"], batch["segment_ids"], self.cfg, self.special.mask,
        self.special.ids, self.vocab_size)
    return {"inputs": inputs, "segment_ids": batch["segment_ids"],
            "positions": batch["positions"], "predict_at": predict_at, "targets": targets,
            "weights": weights}

  @classmethod
  def head_positions(cls, cfg: ObjectiveConfig, seq_len: int) -> int:
    return max_predictions(seq_len, cfg.mask_rate)
