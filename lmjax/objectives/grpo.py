"""Group relative policy optimisation (`objective.kind=grpo`): online RL from rewards.

Each step samples `num_generations` replies to each of its prompts from the current policy
(`lmjax.rollouts`: the serving engine, on the training parameters), scores them with the
run's rewards (`lmjax.objectives.rewards`), normalises each reply's total reward within
its group (`scale_rewards`: group | batch | none) and pushes towards the better replies
with the clipped importance ratio against the sampling policy (Shao et al., 2024):

  per token  -min(r A, clip(r, 1 - epsilon_low, 1 + epsilon_high) A) + beta KL_k3
  r          pi / pi_old per token, or GSPO's per-sequence geometric mean
             (`importance_sampling_level=sequence`, Zheng et al., 2025)

aggregated as `loss_type` says: grpo (each reply's mean over its tokens, then the mean
over replies), dapo (the mean over every completion token of the batch, Yu et al., 2025)
or dr_grpo (the sum over tokens / (replies x max_completion_tokens), Liu et al., 2025).
It is TRL's `GRPOTrainer._compute_loss` term for term, log-probabilities taken from
logits divided by the sampling temperature (tests/test_grpo_parity.py holds the loss and
its gradient equal for every aggregation). With `num_iterations` > 1 a batch of rollouts
is optimised that many steps, against the log-probabilities of the policy that sampled
it (kept with the rollouts); with one, pi_old is pi, detached.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from lmjax.errors import UserError
from lmjax.objectives.base import Batch, Objective, ObjectiveConfig, register
from lmjax.objectives.losses import target_logprobs

Array = jax.Array
LOSS_TYPES = ("grpo", "dapo", "dr_grpo")
SCALES = ("group", "batch", "none")
LEVELS = ("token", "sequence")


@dataclasses.dataclass(frozen=True)
class GRPOConfig(ObjectiveConfig):
  kind: str = "grpo"
  chat_template: str = ""  # as SFT's: "" = the model's own, else lmjax's default
  rewards: tuple[str, ...] = ("exact_match",)  # registered reward names
  reward_weights: tuple[float, ...] = ()  # one per reward (default: all 1)
  answer_field: str = "answer"  # the record field `exact_match` compares with
  format_regex: str = r"(?s).+"  # what `format` requires the whole reply to match
  overlong_cache: int = 4  # `overlong`: tokens before the budget where the penalty ramps
  num_generations: int = 8  # replies sampled per prompt (a group)
  temperature: float = 1.0
  top_p: float = 1.0
  top_k: int = 0
  max_completion_tokens: int = 32
  epsilon_low: float = 0.2
  epsilon_high: float = 0.2  # DAPO's clip-higher: above epsilon_low
  beta: float = 0.0  # weight of the k3 KL to the reference (the initial model)
  scale_rewards: str = "group"  # group | batch | none
  loss_type: str = "dapo"  # grpo | dapo | dr_grpo
  num_iterations: int = 1  # optimiser steps per batch of rollouts
  importance_sampling_level: str = "token"  # token | sequence (GSPO)

  def __post_init__(self):
    super().__post_init__()
    _check_options(self)


def _check_options(c: GRPOConfig) -> None:
  choices = {"loss_type": LOSS_TYPES, "scale_rewards": SCALES,
             "importance_sampling_level": LEVELS}
  for name, allowed in choices.items():
    if getattr(c, name) not in allowed:
      raise ValueError(f"objective.{name} must be one of {', '.join(allowed)}, got "
                       f"{getattr(c, name)!r}")
  if c.num_generations < 2:
    raise ValueError(f"objective.num_generations must be >= 2 (a group's rewards are compared "
                     f"with each other), got {c.num_generations}")
  if not c.rewards:
    raise ValueError("objective.rewards names no reward")
  if c.reward_weights and len(c.reward_weights) != len(c.rewards):
    raise ValueError(f"objective.reward_weights has {len(c.reward_weights)} weights for "
                     f"{len(c.rewards)} rewards")
  if c.temperature <= 0 or not 0 < c.top_p <= 1 or c.top_k < 0:
    raise ValueError("objective.temperature must be > 0, top_p in (0, 1], top_k >= 0")
  if c.max_completion_tokens < 1 or c.num_iterations < 1 or c.overlong_cache < 1:
    raise ValueError("objective.max_completion_tokens, num_iterations and overlong_cache "
                     "must be >= 1")
  if c.epsilon_low < 0 or c.epsilon_high < 0 or c.beta < 0:
    raise ValueError("objective.epsilon_low, epsilon_high and beta must be >= 0")


def advantages(rewards: np.ndarray, weights: np.ndarray, group: int, scale: str
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(N, F) rewards, (F,) weights -> (N,) totals, (N,) advantages and (N,) whether the
  row's group has zero spread, as TRL (`sum_then_normalize`, std with Bessel's correction,
  1e-4 added to it)."""
  total = (rewards.astype(np.float64) * weights).sum(axis=1)
  groups = total.reshape(-1, group)
  mean = np.repeat(groups.mean(axis=1), group)
  std = np.repeat(groups.std(axis=1, ddof=1), group)
  adv = total - mean
  if scale == "batch":
    adv = adv / (total.std(ddof=1) + 1e-4) if len(total) > 1 else adv / 1e-4
  elif scale == "group":
    adv = adv / (std + 1e-4)
  return (total.astype(np.float32), adv.astype(np.float32),
          np.isclose(std, 0.0, rtol=1e-5, atol=1e-8).astype(np.float32))


def sequence_logps(logits: Array, tokens: Array, temperature: float) -> tuple[Array, Array]:
  """(B, T) log-probability of each position's next token under logits / temperature, and
  (B, T) the entropy of that distribution (the last position's: 0)."""
  logits = logits.astype(jnp.float32) / temperature
  targets = jnp.pad(tokens[:, 1:], ((0, 0), (0, 1)))
  logps = target_logprobs(logits, targets)
  log_p = jax.nn.log_softmax(logits)
  entropy = -jnp.sum(jnp.exp(log_p) * log_p, axis=-1)
  return logps, entropy


def policy_terms(cfg: GRPOConfig, logps: Array, old: Array, ref: Array, adv: Array,
                 mask: Array) -> dict[str, Array]:
  """Per-token loss (B, T) and what is logged of it (clipping, KL), TRL's terms."""
  log_ratio = logps - old
  if cfg.importance_sampling_level == "sequence":
    count = jnp.maximum(jnp.sum(mask, -1, keepdims=True), 1.0)
    log_ratio = jnp.sum(log_ratio * mask, -1, keepdims=True) / count  # (B, 1)
  coef = jnp.exp(log_ratio)
  clipped = jnp.clip(coef, 1 - cfg.epsilon_low, 1 + cfg.epsilon_high)
  a = adv[:, None]
  per_token = -jnp.minimum(coef * a, clipped * a)
  kl = jnp.exp(ref - logps) - (ref - logps) - 1
  if cfg.beta:
    per_token = per_token + cfg.beta * kl
  low = (coef < 1 - cfg.epsilon_low) & (a < 0)
  high = (coef > 1 + cfg.epsilon_high) & (a > 0)
  shape = mask.shape
  return {"per_token": jnp.broadcast_to(per_token, shape), "kl": kl,
          "clip_low": jnp.broadcast_to(low, shape), "clip_high": jnp.broadcast_to(high, shape)}


@register("grpo")
class GRPO(Objective):
  """GRPO and its variants (DAPO, Dr. GRPO, GSPO) on rollouts of the current policy."""

  config_class = GRPOConfig
  fine_tunes = True
  template: Any = None
  reference: Any = None  # the initial parameters (the KL's reference), set by `precompute`
  eval_model: Any = None
  adapters: float | None = None  # LoRA: the adapters' scale (the engine applies them)
  _reference_on_device: Any = None

  def datasets(self, data: Any, tokenizer: Any, model: Any, seed: int):
    from lmjax import rollouts
    if model.family != "decoder":
      raise UserError("objective grpo trains decoders; --init_from is an encoder")
    task = self.task
    if not (task.train_file and task.eval_file):
      raise UserError("objective grpo needs task.train_file and task.eval_file (JSON lines of "
                      "prompt or messages, and the fields the rewards read)")
    from lmjax.data import chat
    self.template = chat.load_template(tokenizer, self.cfg.chat_template)
    return rollouts.datasets(self, data.seq_len, tokenizer, model, seed)

  def run_files(self) -> dict[str, str]:
    return {"chat_template.jinja": self.template.text} if self.template else {}

  def precompute(self, datasets: tuple, model: nn.Module, params: Any) -> None:
    """Keeps the initial parameters (with LoRA: the base, adapters off) and the evaluation
    model (with LoRA: a `LoraModel`): the engine starts from them, the KL compares with them."""
    from lmjax.lora import LoraModel
    self.reference, self.eval_model = params, model
    self.adapters = model.scale if isinstance(model, LoraModel) else None
    self._reference_on_device = None

  def kl_reference(self, params: Any) -> Any:
    """The KL's reference parameters, given the policy's. With LoRA, the policy's own frozen
    base with its adapters left out (the train state's arrays: no second copy of the
    weights); else the initial parameters, put on the devices once."""
    from lmjax.lora import without_adapters
    if self.adapters is not None:
      return without_adapters(params)
    if self._reference_on_device is None:
      self._reference_on_device = jax.device_put(self.reference)
    return self._reference_on_device

  def group_advantages(self, scores: np.ndarray, weights: np.ndarray
                       ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    return advantages(scores, weights, self.cfg.num_generations, self.cfg.scale_rewards)

  def next_token_logps(self, params: Any, tokens: Array, segments: Array, positions: Array
                       ) -> Array:
    """(B, T) log-probabilities of each next token under `params` (the deterministic model):
    the sampling policy's and the reference's, computed with the rollouts."""
    logits = self.eval_model.apply({"params": params}, tokens, segments, positions)
    return sequence_logps(logits, tokens, self.cfg.temperature)[0]

  def batch_spec(self, seq_len: int) -> dict[str, tuple[tuple[int, ...], Any]]:
    f = len(self.cfg.rewards)
    row = {k: ((seq_len,), np.int32) for k in ("tokens", "segment_ids", "positions",
                                                 "completion_mask")}
    logps = {k: ((seq_len,), np.float32) for k in ("old_logps", "ref_logps")}
    scalars = {k: ((), np.float32) for k in ROW_SCALARS}
    return {**row, **logps, **scalars, "rewards": ((f,), np.float32)}

  def prepare(self, batch: Batch, rng: Array) -> Batch:
    rows = batch["weights"]  # (B,) 1 for a reply, 0 for padding
    mask = jnp.pad(batch["completion_mask"][:, 1:], ((0, 0), (0, 1))).astype(jnp.float32)
    mask = mask * rows[:, None]  # positions whose next token is a completion token
    per_row = {"grpo": rows, "dapo": None, "dr_grpo": rows * self.cfg.max_completion_tokens}
    weights = per_row[self.cfg.loss_type]
    return {**batch, "mask": mask, "rows": rows,
            "weights": mask if weights is None else weights}

  def loss_sums(self, model: nn.Module, params: Any, batch: Batch,
                rngs: dict[str, Array]) -> dict[str, Array]:
    logits = model.apply({"params": params}, batch["tokens"], batch["segment_ids"],
                         batch["positions"], rngs=rngs)
    logps, entropy = sequence_logps(logits, batch["tokens"], self.cfg.temperature)
    mask = batch["mask"]
    old = batch["old_logps"] if self.cfg.num_iterations > 1 else jax.lax.stop_gradient(logps)
    t = policy_terms(self.cfg, logps, old, batch["ref_logps"], batch["advantages"], mask)
    per_row = jnp.sum(t["per_token"] * mask, -1)  # (B,)
    if self.cfg.loss_type == "grpo":
      per_row = per_row / jnp.maximum(jnp.sum(mask, -1), 1.0)
    total = jnp.sum(per_row)
    tokens = lambda x: jnp.sum(x * mask)
    sums = {"objective": total, "loss": total, "weight": jnp.sum(batch["weights"]),
            "tokens": jnp.sum(mask), "entropy": tokens(entropy), "kl": tokens(t["kl"]),
            "clip_low": tokens(t["clip_low"]), "clip_high": tokens(t["clip_high"]),
            "correct": jnp.zeros(())}
    return {**sums, **self.rollout_sums(batch)}

  def rollout_sums(self, batch: Batch) -> dict[str, Array]:
    """The rollouts' own measures, summed over replies (weights: 0 for padding rows)."""
    rows = batch["rows"] if "rows" in batch else batch["weights"]
    out = {"rows": jnp.sum(rows)}
    for k in ROW_SCALARS:
      if k != "weights":
        out[k] = jnp.sum(batch[k] * rows)
    out["reward_sq"] = jnp.sum(batch["reward"] ** 2 * rows)
    for i, name in enumerate(self.cfg.rewards):
      r = batch["rewards"][:, i]
      out[f"reward_{name}"] = jnp.sum(r * rows)
      out[f"reward_{name}_sq"] = jnp.sum(r ** 2 * rows)
    return out

  def eval_sums(self, model: nn.Module, params: Any, batch: Batch) -> dict[str, Array]:
    """Held out: one greedy reply per prompt, its rewards (no loss: nothing was sampled)."""
    return self.rollout_sums(batch)

  def metrics(self, sums: dict[str, Array]) -> dict[str, Array]:
    n = jnp.maximum(sums["rows"], 1.0)
    std = lambda s, sq: jnp.sqrt(jnp.maximum(sq / n - (s / n) ** 2, 0.0))
    out = {"reward": sums["reward"] / n, "reward_std": std(sums["reward"], sums["reward_sq"]),
           "completion_length": sums["completion_length"] / n,
           "stopped": sums["stopped"] / n, "zero_std_groups": sums["zero_std"] / n,
           "replies": sums["rows"]}
    for name in self.cfg.rewards:
      s = sums[f"reward_{name}"]
      out[f"reward_{name}"] = s / n
      out[f"reward_{name}_std"] = std(s, sums[f"reward_{name}_sq"])
    if "tokens" in sums:  # training: the loss and what the update did
      tokens = jnp.maximum(sums["tokens"], 1.0)
      clipped = sums["clip_low"] + sums["clip_high"]
      out.update(loss=sums["loss"] / jnp.maximum(sums["weight"], 1.0),
                 entropy=sums["entropy"] / tokens, kl=sums["kl"] / tokens,
                 clip_fraction=clipped / tokens, clip_low=sums["clip_low"] / tokens,
                 clip_high=sums["clip_high"] / tokens,
                 rollout_seconds=sums["rollout_seconds"],
                 update_seconds=sums["update_seconds"])
    return out

  @classmethod
  def head_positions(cls, cfg: ObjectiveConfig, seq_len: int) -> int:
    return seq_len


# Per-reply scalars each rollout batch carries (besides the token rows): the row's weight,
# its advantage and total reward, whether its group's rewards were all equal, its length,
# whether it ended at a stop token, and the host seconds of the rollout and of the update
# before it (each spread evenly over the batch's rows, so their sums are the seconds).
ROW_SCALARS = ("weights", "advantages", "reward", "zero_std", "completion_length", "stopped",
               "rollout_seconds", "update_seconds")
