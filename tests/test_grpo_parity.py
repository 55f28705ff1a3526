"""GRPO's loss and its gradient checked number for number against TRL's
`GRPOTrainer._compute_loss` (PyTorch) on fixed prompts, completions, advantages and
logits (the weights' output), for each aggregation and importance-sampling level, within
1e-4; the group-normalised advantages against TRL's formula."""

import collections
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from trl import GRPOTrainer
from trl.trainer.utils import nanstd, selective_log_softmax_and_entropy

from lmjax.objectives import GRPOConfig, build
from lmjax.objectives.grpo import advantages

B, P, C, V = 6, 3, 5, 11  # replies, prompt tokens, completion tokens, vocabulary
LENGTHS = [5, 3, 1, 4, 5, 2]  # each reply's tokens (the rest of its C is padding)


class _Logits:
  """A 'model' whose output is its parameters: the gradient is the one w.r.t. the logits."""

  def apply(self, variables, tokens, segments, positions, rngs=None):
    return variables["params"]["logits"]


def _trl_self(cfg, temperature):
  accel = types.SimpleNamespace(num_processes=1, gather=lambda x: x,
                                gather_for_metrics=lambda x: x, reduce=lambda x, reduction: x)
  fake = types.SimpleNamespace(
      top_entropy_quantile=1.0, off_policy_mask_threshold=None,
      importance_sampling_level=cfg.importance_sampling_level, beta=cfg.beta,
      loss_type=cfg.loss_type, epsilon_low=cfg.epsilon_low, epsilon_high=cfg.epsilon_high,
      use_vllm=False, vllm_importance_sampling_correction=False, aux_loss_enabled=False,
      _entropy_bonus_enabled=False, current_gradient_accumulation_steps=1,
      max_completion_length=cfg.max_completion_tokens, accelerator=accel,
      model=types.SimpleNamespace(training=True),
      args=types.SimpleNamespace(use_bias_correction_kl=False, delta=None, steps_per_generation=1),
      _metrics={"train": collections.defaultdict(list), "eval": collections.defaultdict(list)})

  def logps(model, input_ids, attention_mask, logits_to_keep, **kwargs):
    logits = model[:, -logits_to_keep - 1:-1]  # the positions that predict the completion
    lp, ent = selective_log_softmax_and_entropy(logits, input_ids[:, -logits_to_keep:],
                                                temperature=temperature)
    return lp, ent, None
  fake._get_per_token_logps_and_entropies = logps
  return fake


def _data(seed):
  rng = np.random.default_rng(seed)
  tokens = rng.integers(0, V, (B, P + C)).astype(np.int32)
  mask = (np.arange(C)[None] < np.array(LENGTHS)[:, None]).astype(np.int32)  # (B, C)
  logits = rng.normal(0, 1, (B, P + C, V)).astype(np.float32)
  old = np.log(rng.uniform(0.05, 0.9, (B, C))).astype(np.float32)
  ref = np.log(rng.uniform(0.05, 0.9, (B, C))).astype(np.float32)
  adv = rng.normal(0, 1, B).astype(np.float32)
  return tokens, mask, logits, old, ref, adv


def _lmjax(cfg, tokens, mask, logits, old, ref, adv):
  objective = build(cfg, None, V, None)
  row = lambda x: np.pad(x, ((0, 0), (P - 1, 1)))  # completion index j -> position P - 1 + j
  batch = {"tokens": tokens, "segment_ids": np.ones_like(tokens),
           "positions": np.broadcast_to(np.arange(P + C), tokens.shape).astype(np.int32),
           "completion_mask": np.pad(mask, ((0, 0), (P, 0))), "old_logps": row(old),
           "ref_logps": row(ref), "advantages": adv, "weights": np.ones(B, np.float32),
           **{k: np.zeros(B, np.float32) for k in ("reward", "zero_std", "completion_length",
                                                  "stopped", "rollout_seconds",
                                                  "update_seconds")},
           "rewards": np.zeros((B, len(cfg.rewards)), np.float32)}
  b = objective.prepare(jax.tree.map(jnp.asarray, batch), None)
  total = jnp.maximum(jnp.sum(b["weights"]), 1.0)  # as the train step divides

  def loss(params):
    return objective.loss_sums(_Logits(), params, b, {})["objective"] / total
  value, grad = jax.value_and_grad(loss)({"logits": jnp.asarray(logits)})
  return float(value), np.asarray(grad["logits"])


def _trl(cfg, tokens, mask, logits, old, ref, adv, temperature):
  weights = torch.tensor(logits, requires_grad=True)
  inputs = {"prompt_ids": torch.tensor(tokens[:, :P]).long(),
            "prompt_mask": torch.ones(B, P, dtype=torch.long),
            "completion_ids": torch.tensor(tokens[:, P:]).long(),
            "completion_mask": torch.tensor(mask).long(), "advantages": torch.tensor(adv),
            "ref_per_token_logps": torch.tensor(ref),
            "num_items_in_batch": torch.tensor(float(mask.sum()))}
  if cfg.num_iterations > 1:
    inputs["old_per_token_logps"] = torch.tensor(old)
  loss = GRPOTrainer._compute_loss(_trl_self(cfg, temperature), weights, inputs)
  loss.backward()
  return float(loss), weights.grad.numpy()


@pytest.mark.parametrize("loss_type", ["grpo", "dapo", "dr_grpo"])
@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("iterations,beta", [(1, 0.0), (2, 0.04)])
def test_loss_and_gradient_equal_trl(loss_type, level, iterations, beta):
  cfg = GRPOConfig(loss_type=loss_type, importance_sampling_level=level, beta=beta,
                   num_iterations=iterations, epsilon_low=0.2, epsilon_high=0.28,
                   temperature=0.7, max_completion_tokens=C)
  data = _data(seed=len(loss_type) + 10 * iterations)
  ours, our_grad = _lmjax(cfg, *data)
  theirs, their_grad = _trl(cfg, *data, temperature=0.7)
  assert abs(ours - theirs) < 1e-4, (ours, theirs)
  assert np.abs(their_grad).max() > 1e-3  # a gradient that means something
  np.testing.assert_allclose(our_grad, their_grad, atol=1e-4)


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_advantages_equal_trl(scale):
  rng = np.random.default_rng(0)
  rewards = rng.integers(0, 3, (12, 2)).astype(np.float32)
  rewards[4:8] = [1.0, 2.0]  # a group with zero spread
  weights = np.array([1.0, 0.5])
  total, adv, zero = advantages(rewards, weights, 4, scale)
  r = (torch.tensor(rewards) * torch.tensor(weights, dtype=torch.float32)).sum(1)
  mean = r.view(-1, 4).mean(1).repeat_interleave(4)
  std = (nanstd(r.view(-1, 4), dim=1).repeat_interleave(4) if scale != "batch"
         else nanstd(r).expand_as(r))
  expected = r - mean if scale == "none" else (r - mean) / (std + 1e-4)
  np.testing.assert_allclose(total, r.numpy(), atol=1e-6)
  np.testing.assert_allclose(adv, expected.numpy(), atol=1e-4)
  group_std = nanstd(r.view(-1, 4), dim=1).repeat_interleave(4)
  if scale != "batch":
    np.testing.assert_array_equal(zero, torch.isclose(group_std, torch.zeros(12)).numpy())
  assert zero[4:8].all() and not zero[:4].any()
