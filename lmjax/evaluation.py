"""Held-out evaluation of any model lmjax can load, on any text files or token store.

Deterministic: rows are the files' documents packed in order, and MLM masks
come from a fixed key per batch, so two runs give the same numbers.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from lmjax import objectives
from lmjax.data.batches import PackedDataset
from lmjax.data.corpus import open_corpus
from lmjax.data.pipeline import delimiters
from lmjax.errors import UserError
from lmjax.pretrained import Pretrained, require_weights
from lmjax.steps import eval_step, step_fns


def evaluate_files(source: Pretrained, files: list[str], seq_len: int = 0, batch_size: int = 8,
                   max_batches: int = 0, seed: int = 0,
                   cache_dir: str = "~/.cache/lmjax/tokens") -> dict[str, float]:
  """Loss, accuracy, perplexity (CLM) and tokens evaluated over `files`."""
  cfg = source.model
  seq_len = seq_len or min(cfg.max_len, 512)
  if seq_len > cfg.max_len:
    raise UserError(f"seq_len={seq_len} exceeds the model's max_len={cfg.max_len}")
  sp = source.tokenizer.special
  begin, end = delimiters(source.tokenizer, source.objective)
  corpus = open_corpus(files, source.tokenizer, begin, end, source.objective, cache_dir, "eval")
  data = PackedDataset(corpus, seq_len, seed, shuffle=False)
  objective = objectives.build(objectives.objective_class(source.objective).config_class(
      kind=source.objective), sp, cfg.vocab_size)
  fns = step_fns(cfg.replace(dropout_rate=0.0, remat_policy="none"), objective)  # no optimizer
  require_weights(source, fns.eval_model, jnp.zeros((1, seq_len), jnp.int32), "evaluation")
  step = jax.jit(lambda p, b, r: eval_step(fns, p, b, r))
  n = data.num_eval_batches(batch_size)
  n = min(n, max_batches) if max_batches else n
  total = None
  for i in range(n):
    sums = step(source.params, data.eval_batch(i, batch_size), jax.random.PRNGKey(seed + i))
    total = sums if total is None else jax.tree.map(jnp.add, total, sums)
  metrics = {k: float(v) for k, v in objective.metrics(total).items()}
  if source.objective == "mlm":
    del metrics["perplexity"]  # of masked tokens only: not a language-model perplexity
  return {**metrics, "batches": n, "seq_len": seq_len, "objective": source.objective}
