"""The plain PyTorch AdamW loop, the peer of benchmarks.optimizers, on lmjax's own batches.

The same peer `benchmarks.train_step` times (a `transformers` GPT2LMHeadModel and
`torch.optim.AdamW`), here trained to a held-out loss on identical tokens: the batch of
step s is lmjax's `PackedDataset.batch(s)` for the same seed, with lmjax's packing
(a 4-D block-diagonal causal mask and positions restarting at each document, so no
token attends across a document boundary), lmjax's next-token targets within a
document, and the same held-out batches. The schedule (linear warmup, cosine to
`end_lr_ratio`), betas, eps, global-norm clipping and weight decay on matrices and
embeddings only are lmjax's AdamW settings. What differs is the framework: PyTorch's
initialisation (transformers' GPT-2: normal(0.02), residual projections scaled by
1/sqrt(2 x layers), as lmjax's) and its float32 kernels.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from lmjax.data.pipeline import build_datasets
from lmjax.data.tokenizer import Tokenizer
from lmjax.experiment import Experiment


def _model(exp: Experiment):
  import transformers as T
  m = exp.model
  return T.GPT2LMHeadModel(T.GPT2Config(
      vocab_size=m.vocab_size, n_positions=m.max_len, n_embd=m.d_model, n_layer=m.num_layers,
      n_head=m.num_heads, n_inner=m.d_ff, activation_function="gelu_new",
      layer_norm_epsilon=m.norm_eps, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
      bos_token_id=None, eos_token_id=None, tie_word_embeddings=True))


def _optimizer(model, exp: Experiment):
  import torch
  o, steps = exp.optimizer, exp.train.steps
  decayed = [p for n, p in model.named_parameters() if p.ndim >= 2]  # matrices, embeddings
  rest = [p for n, p in model.named_parameters() if p.ndim < 2]  # biases, LayerNorm
  opt = torch.optim.AdamW([{"params": decayed, "weight_decay": o.weight_decay},
                           {"params": rest, "weight_decay": 0.0}], lr=o.learning_rate,
                          betas=(o.b1, o.b2), eps=o.eps)
  warmup = min(o.warmup_steps, steps - 1)

  def factor(step):  # lmjax's warmup + cosine (optax.cosine_decay_schedule)
    if step < warmup:
      return step / warmup
    t = min((step - warmup) / max(steps - warmup, 1), 1.0)
    return o.end_lr_ratio + (1 - o.end_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t))
  return opt, torch.optim.lr_scheduler.LambdaLR(opt, factor)


def _loss(model, batch: dict[str, np.ndarray]):
  """lmjax's CLM loss of a packed batch: next tokens within each document."""
  import torch
  tokens = torch.tensor(batch["tokens"], dtype=torch.long)
  seg = torch.tensor(batch["segment_ids"], dtype=torch.long)
  pos = torch.tensor(batch["positions"], dtype=torch.long)
  t = tokens.shape[1]
  causal = torch.tril(torch.ones(t, t, dtype=torch.bool))
  mask = (seg[:, :, None] == seg[:, None, :]) & causal  # padding rows see padding: no NaN
  logits = model(input_ids=tokens, attention_mask=mask[:, None], position_ids=pos).logits
  targets = torch.nn.functional.pad(tokens[:, 1:], (0, 1))
  weights = ((torch.nn.functional.pad(seg[:, 1:], (0, 1)) == seg) & (seg != 0)).float()
  nll = torch.nn.functional.cross_entropy(logits.float().reshape(-1, logits.shape[-1]),
                                          targets.reshape(-1), reduction="none")
  return (nll * weights.reshape(-1)).sum(), weights.sum()


def train(exp: Experiment) -> list[tuple[int, float]]:
  """Trains as `exp` says (steps, batch, seed, optimizer); returns [(step, held-out loss)]
  at every `train.eval_every` steps and at the end."""
  import torch
  t = exp.train
  torch.manual_seed(t.seed)
  train_data, eval_data = build_datasets(exp.data, Tokenizer(exp.data.tokenizer), "clm", t.seed)
  model = _model(exp)
  opt, schedule = _optimizer(model, exp)
  curve = []
  for step in range(t.steps):
    model.train()
    total, count = _loss(model, train_data.batch(step, t.batch_size))
    (total / count.clamp(min=1)).backward()
    if exp.optimizer.clip_grad_norm > 0:
      torch.nn.utils.clip_grad_norm_(model.parameters(), exp.optimizer.clip_grad_norm)
    opt.step()
    opt.zero_grad(set_to_none=True)
    schedule.step()
    if (t.eval_every and (step + 1) % t.eval_every == 0) or step + 1 == t.steps:
      curve.append((step + 1, evaluate(model, eval_data, exp)))
  return curve


def evaluate(model: Any, data: Any, exp: Experiment) -> float:
  """Mean next-token loss over the first `train.eval_batches` held-out batches, as lmjax's."""
  import torch
  t = exp.train
  n = min(data.num_eval_batches(t.batch_size), t.eval_batches or 10**9)
  model.eval()
  total = count = 0.0
  with torch.no_grad():
    for i in range(n):
      s, c = _loss(model, data.eval_batch(i, t.batch_size))
      total, count = total + float(s), count + float(c)
  return total / max(count, 1.0)
