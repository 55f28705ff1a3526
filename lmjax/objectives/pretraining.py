"""Pretraining objectives: causal (CLM) and masked (MLM) language modelling on packed rows."""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax

from lmjax.errors import check_ranges
from lmjax.model.moe import apply_with_router_stats, router_sums
from lmjax.objectives.base import Batch, Objective, ObjectiveConfig, register
from lmjax.objectives.losses import (clm_targets, cross_entropy_sums, fused_cross_entropy_sums,
                                     max_predictions, mlm_mask)

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class LMConfig(ObjectiveConfig):
  """Options of a vocabulary head's cross-entropy (CLM, MLM, SFT)."""

  z_loss: float = 0.0  # weight of log(Z)^2, keeps logits from drifting
  label_smoothing: float = 0.0
  # Vocabulary head + loss fused over chunks of positions, never building the (B, T, V)
  # logits (`fused_cross_entropy_sums`): auto (on CPU, where it is faster) | on | off.
  fused_head: str = "auto"

  def __post_init__(self):
    super().__post_init__()
    check_ranges("objective", self, non_negative=("z_loss",), fractions=("label_smoothing",))
    if self.fused_head not in ("auto", "on", "off"):
      raise ValueError(f"objective.fused_head must be auto, on or off, got {self.fused_head!r}")

  def use_fused_head(self) -> bool:
    """Whether the train and eval steps fuse the vocabulary head into the loss. `auto`: on
    CPU, where XLA's (N, V) logits matmuls and their transposes cost a third of a small
    model's step; on TPU and GPU, fused matmuls of the full logits are the faster path."""
    if self.fused_head == "auto":
      return jax.default_backend() == "cpu"
    return self.fused_head == "on"


@dataclasses.dataclass(frozen=True)
class MLMConfig(LMConfig):
  kind: str = "mlm"
  mask_rate: float = 0.15  # share of ordinary tokens selected as targets (exact per row)
  mask_token_prob: float = 0.8  # of the selected: replaced by [MASK]
  random_token_prob: float = 0.1  # of the selected: replaced by a random token; rest kept

  def __post_init__(self):
    super().__post_init__()
    check_ranges("objective", self, non_negative=("mask_token_prob", "random_token_prob"))
    if not 0 < self.mask_rate < 1 or self.mask_token_prob + self.random_token_prob > 1:
      raise ValueError("objective: need 0 < mask_rate < 1 and mask_token_prob + "
                       "random_token_prob <= 1")


class LanguageModelling(Objective):
  """Cross-entropy of a vocabulary head at the positions `prepare` picks, on rows packed
  from a corpus (token stores or text files, `data.train_files`)."""

  config_class = LMConfig
  frame = "clm"  # the ids around each document: clm [bos] .. [eos], mlm [cls] .. [sep]

  def datasets(self, data: Any, tokenizer: Any, model: Any, seed: int):
    from lmjax.data.pipeline import build_datasets
    return build_datasets(data, tokenizer, self.frame, seed)

  def loss_sums(self, model: nn.Module, params: Any, batch: Batch,
                rngs: dict[str, Array]) -> dict[str, Array]:
    cfg = self.cfg
    fused = cfg.use_fused_head()
    # A mixture-of-experts model's router statistics come too (None for a dense model).
    out, router = apply_with_router_stats(
        model, {"params": params}, batch["inputs"], batch["segment_ids"], batch["positions"],
        predict_at=batch.get("predict_at"), project=not fused, rngs=rngs)
    if fused:  # out: the head's Projection; no (B, T, V) logits are built
      sums = fused_cross_entropy_sums(
          out.features, out.weight, out.bias, batch["targets"], batch["weights"],
          out.vocab_first, cfg.z_loss, cfg.label_smoothing, matmul_dtype=out.matmul_dtype,
          softcap=out.softcap)
    else:
      sums = cross_entropy_sums(out, batch["targets"], batch["weights"],  # (B, T or K, V)
                                cfg.z_loss, cfg.label_smoothing)
    return router_sums(sums, router, model.cfg)  # the router's losses join the objective


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

  config_class = MLMConfig
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
