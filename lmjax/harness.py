"""EleutherAI's lm-evaluation-harness on lmjax decoders: `loglikelihood`,
`loglikelihood_rolling` and `generate_until` (the KV-cache decoder, with stop strings).

Requests are encoded as lm-eval's own `hf` model encodes them with
`add_bos_token=True` (lmjax decoders are pretrained on [bos] document [eos]), so
the two give the same per-request numbers on the same weights. Requests are
sorted by length and padded to a few power-of-two length buckets, in batches of
a fixed size, so the number of compiled programs stays small (`compiled_shapes`).
"""

from __future__ import annotations

import functools
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from lm_eval import utils as lm_utils
from lm_eval.api.model import LM

from lmjax.data.chat import load_template
from lmjax.errors import UserError
from lmjax.inference.generate import Generator, SamplingConfig
from lmjax.model import build_model
from lmjax.objectives.losses import target_logprobs
from lmjax.pretrained import Pretrained

MIN_BUCKET = 16


def bucket(length: int, max_len: int) -> int:
  """The padded length of a row: the next power of two (at least MIN_BUCKET, at most max_len)."""
  return min(max(MIN_BUCKET, 1 << (max(length, 1) - 1).bit_length()), max_len)


class LmjaxLM(LM):
  """An lmjax decoder (run or Hugging Face directory) as an lm-eval model."""

  def __init__(self, source: Pretrained, batch_size: int = 8, max_gen_toks: int = 256,
               chat: bool = False):
    super().__init__()
    if source.model.family != "decoder":
      raise UserError("lm-evaluation-harness scores decoders (CLM); this model is an encoder")
    self.source, self.batch_size, self.max_gen_toks = source, batch_size, max_gen_toks
    self.cfg = source.model.replace(dropout_rate=0.0, remat_policy="none")
    self.tokenizer = source.tokenizer
    self.bos = source.tokenizer.special.bos
    self.model = build_model(self.cfg)
    self.compiled_shapes: set[tuple[int, int]] = set()
    self._generator: Generator | None = None
    # --apply_chat_template: prompts come rendered by the model's chat template, which
    # writes its own special tokens; replies end at its end-of-turn marker.
    self.template = load_template(self.tokenizer) if chat else None

  @property
  def tokenizer_name(self) -> str:
    return f"lmjax-{self.tokenizer.sha256[:16]}"

  def chat_template(self, chat_template: bool | str = False) -> str | None:
    return self.template.text if self.template else None

  def apply_chat_template(self, chat_history: list[dict[str, str]],
                          add_generation_prompt: bool = True) -> str:
    if self.template is None:
      raise UserError("this harness model was built without a chat template")
    return self.template.render(chat_history, add_generation_prompt)

  # ----------------------------------------------------------------------------- scoring

  def tok_encode(self, text: str) -> list[int]:
    if self.template is not None:  # rendered text: its special tokens are in it
      return self.tokenizer.encode_with_offsets(text)[0] or [self.bos]
    return [self.bos, *self.tokenizer.encode([text])[0]] if text else [self.bos]

  @functools.partial(jax.jit, static_argnums=(0,))
  def _score(self, params, tokens, targets, weights):
    """Summed log-probability of the scored targets (weight 1; 0: context, -1: padding),
    and whether each of them is the argmax."""
    logits = self.model.apply({"params": params}, tokens, (weights >= 0).astype(jnp.int32))
    target_logp = target_logprobs(logits, targets)  # (B, T)
    scored = weights > 0
    greedy = jnp.all(~scored | (jnp.argmax(logits, -1) == targets), axis=1)
    return jnp.sum(jnp.where(scored, target_logp, 0.0), axis=1), greedy

  def score_rows(self, rows: Sequence[tuple[list[int], int]]) -> list[tuple[float, bool]]:
    """For each (tokens, n): the log-probability of the last n tokens given the rest (the
    row keeps its newest max_len + 1 tokens), and whether greedy decoding produces them."""
    out: list[Any] = [None] * len(rows)
    order = sorted(range(len(rows)), key=lambda i: -len(rows[i][0]))
    for start in range(0, len(order), self.batch_size):
      chosen = order[start:start + self.batch_size]
      seqs = [rows[i][0][-(self.cfg.max_len + 1):] for i in chosen]
      length = bucket(max(len(s) - 1 for s in seqs), self.cfg.max_len)
      tokens = np.zeros((self.batch_size, length), np.int32)
      targets = np.zeros_like(tokens)
      weights = np.full((self.batch_size, length), -1, np.int8)  # -1 padding, 0 context, 1 scored
      for r, (i, seq) in enumerate(zip(chosen, seqs)):
        n = len(seq) - 1
        tokens[r, :n], targets[r, :n], weights[r, :n] = seq[:-1], seq[1:], 0
        weights[r, n - min(rows[i][1], n):n] = 1
      self.compiled_shapes.add((self.batch_size, length))
      logp, greedy = jax.device_get(self._score(self.source.params, tokens, targets, weights))
      for r, i in enumerate(chosen):
        out[i] = (float(logp[r]), bool(greedy[r]))
    return out

  def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
    rows = []
    for context, continuation in (r.args for r in requests):
      if not context:  # as lm-eval's hf model: the prefix token, then the whole encoding
        whole = self.tok_encode(continuation)
        rows.append(([self.bos, *whole], len(whole)))
        continue
      spaces = len(context) - len(context.rstrip())  # as lm-eval's hf model: to the continuation
      if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
      whole, ctx = self.tok_encode(context + continuation), self.tok_encode(context)
      rows.append((whole, len(whole) - len(ctx)))
    return self.score_rows(rows)

  def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
    windows, owner = [], []
    for i, (text,) in enumerate(r.args for r in requests):
      for context, target in map(lm_utils.make_disjoint_window, lm_utils.get_rolling_token_windows(
          token_list=self.tok_encode(text), prefix_token=self.bos,
          max_seq_len=self.cfg.max_len, context_len=1)):
        windows.append(([*context, *target], len(target)))
        owner.append(i)
    totals = [0.0] * len(requests)
    for i, (logp, _) in zip(owner, self.score_rows(windows)):
      totals[i] += logp
    return totals

  # ----------------------------------------------------------------------------- generation

  def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
    if self._generator is None:
      sp = self.tokenizer.special
      eos = self.template.end_of_turn(self.tokenizer) if self.template else sp.eos
      self._generator = Generator(self.cfg, self.source.params, eos, sp.pad)
    out = []
    for context, kwargs in (r.args for r in requests):
      until = kwargs.get("until") or []
      until = [until] if isinstance(until, str) else list(until)
      new = min(int(kwargs.get("max_gen_toks", self.max_gen_toks)), self.cfg.max_len - 1)
      if kwargs.get("do_sample") or kwargs.get("temperature", 0):
        raise UserError("lmjax's harness model decodes greedily; the task asks for sampling")
      prompt = self.tok_encode(context)[-(self.cfg.max_len - new):]
      ids = self._generator.generate([prompt], SamplingConfig(max_new_tokens=new))[0]
      text = self.tokenizer.decode(ids)
      for stop in until:
        text = text.split(stop)[0] if stop else text
      out.append(text)
    return out


@functools.lru_cache(maxsize=8)  # a training run scores the same tasks at every lm_eval step
def task_manager(tasks: tuple[str, ...], include_path: str | None) -> Any:
  """lm-eval's task index: only `include_path`'s tasks when they are all the run asks for
  (indexing lm-eval's 14,000 built-in tasks takes 20-50 s), else everything."""
  from lm_eval.tasks import TaskManager
  if include_path:
    local = TaskManager(include_path=include_path, include_defaults=False)
    if all(task in local.all_tasks for task in tasks):
      return local
    return TaskManager(include_path=include_path)
  return TaskManager()


def run(source: Pretrained, tasks: list[str], num_fewshot: int | None = None,
        batch_size: int = 8, limit: int | None = None, include_path: str | None = None,
        log_samples: bool = False, apply_chat_template: bool = False) -> dict[str, Any]:
  """`lm_eval.simple_evaluate` on an lmjax model; the results dict, plus how many shapes
  were compiled."""
  import lm_eval
  model = LmjaxLM(source, batch_size, chat=apply_chat_template)
  manager = task_manager(tuple(tasks), include_path)
  try:
    results = lm_eval.simple_evaluate(model=model, tasks=tasks, num_fewshot=num_fewshot,
                                      limit=limit, task_manager=manager,
                                      log_samples=log_samples, batch_size=batch_size,
                                      apply_chat_template=apply_chat_template)
  except KeyError as e:
    raise UserError(f"unknown lm-eval task {e} (give --include_path for local tasks)") from None
  logging.info("lm-eval: %d compiled shapes %s", len(model.compiled_shapes),
               sorted(model.compiled_shapes))
  results["compiled_shapes"] = len(model.compiled_shapes)
  return results


def training_metrics(exp: Any, params: Any, tokenizer_path: str) -> dict[str, float]:
  """`train.lm_eval_tasks` on a training run's current parameters, as `task/metric`."""
  from lmjax.data.tokenizer import Tokenizer
  t = exp.train
  source = Pretrained(exp.model, params, Tokenizer(tokenizer_path), "clm", "this run")
  results = run(source, list(t.lm_eval_tasks), batch_size=8, limit=t.lm_eval_limit or None,
                include_path=t.lm_eval_include_path or None)
  return {f"{task}/{key.split(',')[0]}": float(value)
          for task, values in results["results"].items() for key, value in values.items()
          if isinstance(value, (int, float)) and not key.startswith("alias")
          and "_stderr" not in key}
