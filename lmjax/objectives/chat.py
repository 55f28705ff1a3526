"""Dialogue objectives of `launch.finetune`: supervised fine-tuning on conversations (sft)
and direct preference optimisation (dpo).

Conversations come from the `task` section's JSON lines (`lmjax.data.chat`),
rendered with the chat template (`objective.chat_template`, else the pretrained
tokenizer's own, else lmjax's default), packed several per row with segment ids.
The loss is next-token cross-entropy on the assistant's tokens only, so the
held-out `loss` and `accuracy` are per assistant token.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from lmjax.errors import UserError
from lmjax.model.moe import apply_with_router_stats, router_metrics, router_sums
from lmjax.objectives.base import Batch, ObjectiveConfig, register
from lmjax.objectives.losses import clm_targets, target_logprobs
from lmjax.objectives.pretraining import LanguageModelling, LMConfig

TRUNCATION = ("off", "drop", "newest")


def _check_chat_options(cfg: Any) -> None:
  if cfg.truncation not in TRUNCATION:
    raise ValueError(f"objective.truncation must be off, drop or newest, got {cfg.truncation!r}")


@dataclasses.dataclass(frozen=True)
class SFTConfig(LMConfig):
  kind: str = "sft"
  # A .jinja chat template file ("" = the model's own, else lmjax's default).
  chat_template: str = ""
  # Conversations longer than data.seq_len: off (an error) | drop | newest (the newest
  # turns that fit, ending at an assistant turn).
  truncation: str = "drop"
  pack: bool = True  # several conversations per row

  def __post_init__(self):
    super().__post_init__()
    _check_chat_options(self)


@dataclasses.dataclass(frozen=True)
class DPOConfig(ObjectiveConfig):
  kind: str = "dpo"
  chat_template: str = ""  # as SFT's
  truncation: str = "drop"  # off | drop (newest keeps no pair whole)
  beta: float = 0.1  # strength of the KL penalty toward the reference (initial) model
  label_smoothing: float = 0.0  # conservative DPO: the chance that a preference is flipped

  def __post_init__(self):
    super().__post_init__()
    _check_chat_options(self)
    if self.beta <= 0:
      raise ValueError(f"objective.beta must be positive, got {self.beta}")
    if not 0 <= self.label_smoothing < 0.5:
      raise ValueError(f"objective.label_smoothing must be in [0, 0.5), got "
                       f"{self.label_smoothing}")

Array = jax.Array


class ChatObjective(LanguageModelling):
  """Shared by the chat objectives: decoders only, the template kept with the run."""

  fine_tunes = True
  template: Any = None  # the ChatTemplate `datasets` rendered with

  records = ""  # what its files hold, for the error that names them

  def datasets(self, data: Any, tokenizer: Any, model: Any, seed: int):
    from lmjax.data import chat
    from lmjax.data.examples import ExampleDataset
    if model.family != "decoder":
      raise UserError(f"objective {self.kind} fine-tunes decoders; --init_from is an encoder")
    task = self.task
    if not (task.train_file and task.eval_file):
      raise UserError(f"objective {self.kind} needs task.train_file and task.eval_file (JSON "
                      f"lines of {self.records})")
    self.template = chat.load_template(tokenizer, self.cfg.chat_template)
    return tuple(ExampleDataset(self.rows(split, path, tokenizer, data.seq_len), seed)
                 for split, path in (("train", task.train_file), ("eval", task.eval_file)))

  def rows(self, split: str, path: str, tokenizer: Any, seq_len: int) -> dict[str, Any]:
    """The (N, T) arrays of one file's records."""
    raise NotImplementedError

  def run_files(self) -> dict[str, str]:
    return {"chat_template.jinja": self.template.text} if self.template else {}

  def batch_spec(self, seq_len: int) -> dict[str, tuple[tuple[int, ...], Any]]:
    row = {k: ((seq_len,), np.int32) for k in ("tokens", "segment_ids", "positions", "loss_mask")}
    return {**row, "weights": ((), np.float32)}


@register("sft")
class SFT(ChatObjective):
  """Chat SFT: the assistant's tokens of packed conversations."""

  config_class = SFTConfig
  records = "messages, or prompt and completion"

  def rows(self, split: str, path: str, tokenizer: Any, seq_len: int) -> dict[str, Any]:
    from lmjax.data import chat
    cfg = self.cfg
    packed = chat.pack_conversations(path, tokenizer, self.template, seq_len,
                                     cfg.truncation, 0 if cfg.pack else 1)
    logging.info("%s %s: %d conversations (%d dropped, %d cut to their newest turns) in %d "
                 "rows: %.0f%% real tokens, %.0f%% loss tokens", split, path,
                 packed.conversations, packed.dropped, packed.cut, len(packed.arrays["tokens"]),
                 100 * packed.real_share, 100 * packed.loss_share)
    return packed.arrays

  def prepare(self, batch: Batch, rng: Array) -> Batch:
    tokens, segments = batch["tokens"], batch["segment_ids"]
    targets, same_segment = clm_targets(tokens, segments)
    next_is_assistant = jnp.pad(batch["loss_mask"][:, 1:], ((0, 0), (0, 1)))  # (B, T)
    weights = same_segment * next_is_assistant * batch["weights"][:, None]  # padding rows: 0
    return {"inputs": tokens, "segment_ids": segments, "positions": batch["positions"],
            "targets": targets, "weights": weights}


@register("dpo")
class DPO(ChatObjective):
  """Direct preference optimisation (Rafailov et al., 2023), TRL's `sigmoid` loss:
  -(1-e) log s(beta d) - e log s(-beta d), d = (log pi/ref)(chosen) - (log pi/ref)(rejected),
  log-probabilities summed over each completion's tokens. The reference is the initial
  model, its log-probabilities computed once per start before training (`precompute`)."""

  config_class = DPOConfig
  records = "prompt, chosen and rejected"

  def rows(self, split: str, path: str, tokenizer: Any, seq_len: int) -> dict[str, Any]:
    from lmjax.data import chat
    pairs = chat.preference_rows(path, tokenizer, self.template, seq_len, self.cfg.truncation)
    logging.info("%s %s: %d preference pairs (%d dropped as longer than data.seq_len)", split,
                 path, pairs.conversations, pairs.dropped)
    n = len(pairs.arrays["chosen_tokens"])
    return {**pairs.arrays, "ref_chosen": np.zeros(n, np.float32),  # set by `precompute`
            "ref_rejected": np.zeros(n, np.float32)}

  def batch_spec(self, seq_len: int) -> dict[str, tuple[tuple[int, ...], Any]]:
    row = super().batch_spec(seq_len)
    sides = {f"{side}_{k}": v for side in ("chosen", "rejected") for k, v in row.items()
             if k != "weights"}
    return {**sides, "ref_chosen": ((), np.float32), "ref_rejected": ((), np.float32),
            "weights": ((), np.float32)}

  def precompute(self, datasets: tuple, model: nn.Module, params: Any) -> None:
    """The reference log-probabilities of every pair, from the initial `params`."""
    logps = jax.jit(lambda p, t, s, pos, m: _completion_logps(model, p, t, s, pos, m))
    for data in datasets:
      arrays = data.arrays
      for side in ("chosen", "rejected"):
        got = [np.asarray(logps(params, *(arrays[f"{side}_{k}"][i:i + 64] for k in
                                          ("tokens", "segment_ids", "positions", "loss_mask"))))
               for i in range(0, len(arrays[f"{side}_tokens"]), 64)]
        arrays[f"ref_{side}"] = np.concatenate(got).astype(np.float32)

  def prepare(self, batch: Batch, rng: Array) -> Batch:
    return dict(batch)

  def loss_sums(self, model: nn.Module, params: Any, batch: Batch,
                rngs: dict[str, Array]) -> dict[str, Array]:
    both = {k: jnp.concatenate([batch[f"chosen_{k}"], batch[f"rejected_{k}"]])
            for k in ("tokens", "segment_ids", "positions", "loss_mask")}  # (2B, T)
    logps, router = _logps_and_router(model, params, both["tokens"], both["segment_ids"],
                                      both["positions"], both["loss_mask"], rngs)
    chosen, rejected = jnp.split(logps, 2)  # (B,) each
    beta, eps = self.cfg.beta, self.cfg.label_smoothing
    reward_chosen = beta * (chosen - batch["ref_chosen"])
    reward_rejected = beta * (rejected - batch["ref_rejected"])
    margin = reward_chosen - reward_rejected  # beta * d
    loss = -(1 - eps) * jax.nn.log_sigmoid(margin) - eps * jax.nn.log_sigmoid(-margin)
    w = batch["weights"]  # (B,) 1 for pairs, 0 for padding rows
    total = jnp.sum(loss * w)
    sums = {"loss": total, "objective": total,
            "correct": jnp.sum((reward_chosen > reward_rejected) * w), "weight": jnp.sum(w),
            "reward_chosen": jnp.sum(reward_chosen * w),
            "reward_rejected": jnp.sum(reward_rejected * w), "margin": jnp.sum(margin * w)}
    return router_sums(sums, router, model.cfg)  # a mixture of experts' router losses

  def metrics(self, sums: dict[str, Array]) -> dict[str, Array]:
    n = jnp.maximum(sums["weight"], 1.0)
    return {"loss": sums["loss"] / n, "reward_accuracy": sums["correct"] / n,
            "reward_chosen": sums["reward_chosen"] / n,
            "reward_rejected": sums["reward_rejected"] / n, "reward_margin": sums["margin"] / n,
            "pairs": sums["weight"], **router_metrics(sums)}

  @classmethod
  def head_positions(cls, cfg: ObjectiveConfig, seq_len: int) -> int:
    return 2 * seq_len  # a chosen and a rejected row per pair


def _completion_logps(model: nn.Module, params: Any, tokens: Array, segments: Array,
                      positions: Array, mask: Array, rngs: dict[str, Array] | None = None
                      ) -> Array:
  """Per row: the summed log-probability of its completion tokens (`mask`), (N,)."""
  return _logps_and_router(model, params, tokens, segments, positions, mask, rngs)[0]


def _logps_and_router(model: nn.Module, params: Any, tokens: Array, segments: Array,
                      positions: Array, mask: Array, rngs: dict[str, Array] | None = None
                      ) -> tuple[Array, Any]:
  """`_completion_logps`, and a mixture of experts' router statistics (None if dense)."""
  logits, router = apply_with_router_stats(model, {"params": params}, tokens, segments,
                                           positions, rngs=rngs or {})
  targets = jnp.pad(tokens[:, 1:], ((0, 0), (0, 1)))
  weights = jnp.pad(mask[:, 1:], ((0, 0), (0, 1))).astype(jnp.float32)  # predicts a completion
  return jnp.sum(target_logprobs(logits, targets) * weights, axis=-1), router  # (N,)
