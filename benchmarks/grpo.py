"""GRPO's step against its parts and against SFT, in one run, on this machine.

  python -m benchmarks.grpo [--quick] [--json OUT] [--init_from runs/chat_tiny]
  python -m benchmarks.grpo --held_out runs/grpo_warmup,runs/grpo_tiny [--variant passages]

--held_out: each run's greedy replies to experiments/grpo_tiny.py's held-out prompts (of
its default task, or of `--variant`'s) and their mean rewards (`reward_exact_match`: the
held-out exact match), through the same evaluation a GRPO run makes; no timing.

At clm_tiny's shape (d128, 4 layers; random weights unless --init_from), on the prompts of
experiments/data/grpo_train.jsonl (seq 208, 4 prompts x 8 replies, up to 12 tokens each):

- the share of a GRPO step spent generating (the rollout: prefill, sampling, rewards) and
  updating (the jitted train step on the rollout's batch);
- rollout tokens/s (`Engine.complete` on the training thread, the current parameters)
  against the same engine serving the same requests from its own thread (`Engine.start`,
  every request submitted at once), the same replies either way (same seeds);
- the whole GRPO step (rollout + update) and its update alone against an SFT step on the
  same number of rows and tokens (batch 32 x seq 208).
Minimum of the repeats, candidates interleaved.
"""

from __future__ import annotations

import functools
import json
import os
import threading
import time

import jax
import numpy as np
from absl import app, flags

from lmjax import objectives
from lmjax import train as train_lib
from lmjax.data import BUNDLED_DIR, Tokenizer
from lmjax.data.examples import TaskConfig
from lmjax.model import TransformerConfig
from lmjax.optim import OptimizerConfig
from lmjax.sharding import unbox

flags.DEFINE_bool("quick", False, "fewer repeats")
flags.DEFINE_bool("tiny", False, "d32 L2, 2 prompts x 2 replies, one repeat: checks that it runs")
flags.DEFINE_string("json", "", "write the figures here")
flags.DEFINE_string("init_from", "", "an lmjax chat run to take the weights from")
flags.DEFINE_list("held_out", [], "runs whose held-out rewards to measure (no timing)")
flags.DEFINE_string("variant", "", "--held_out: experiments/grpo_tiny.py's variant (passages)")
FLAGS = flags.FLAGS

DATA = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "experiments",
                    "data")
SEQ, GROUPS, GENERATIONS, REPLY = 208, 4, 8, 12
ROWS = GROUPS * GENERATIONS


def _model_and_tokenizer():
  if FLAGS.init_from:
    from lmjax import pretrained
    source = pretrained.load(FLAGS.init_from)
    return source.model.replace(dropout_rate=0.0, max_len=max(source.model.max_len, SEQ)), \
        source.tokenizer, source.params
  width, layers = (32, 2) if FLAGS.tiny else (128, 4)
  model = TransformerConfig(family="decoder", vocab_size=2048, max_len=SEQ, d_model=width,
                            num_layers=layers, num_heads=4, d_ff=4 * width, scan_layers=False,
                            dtype="float32")
  return model, Tokenizer(os.path.join(BUNDLED_DIR, "tokenizer.model")), None


def _setup(kind: str, model: TransformerConfig, tok, **options):
  cfg = objectives.objective_class(kind).config_class(kind=kind, **options)
  path = os.path.join(DATA, "grpo_train.jsonl")
  objective = objectives.build(cfg, tok.special, model.vocab_size,
                               TaskConfig(train_file=path, eval_file=path))
  fns = train_lib.step_fns(model, objective, OptimizerConfig(learning_rate=1e-4, warmup_steps=0),
                           100)
  state = jax.jit(lambda: unbox(train_lib.init_state(fns, 0, (1, SEQ))))()
  return objective, fns, state


def _stepper(fns, state):
  step = jax.jit(functools.partial(train_lib.train_step, fns), donate_argnums=(0,))
  holder = [state]

  def run(batch) -> float:
    start = time.perf_counter()
    holder[0], metrics = step(holder[0], batch)
    jax.block_until_ready(metrics)
    return time.perf_counter() - start
  return run, holder


def _served(engine, requests) -> float:
  """Seconds for the started engine to finish `requests`, all submitted at once."""
  done = [threading.Event() for _ in requests]
  for r, d in zip(requests, done):
    inner = r.emit
    r.emit = lambda e, inner=inner, d=d: (inner(e), d.set() if e[0] == "done" else None)
  start = time.perf_counter()
  for r in requests:
    engine.submit(r)
  for d in done:
    if not d.wait(600):
      raise TimeoutError("the engine did not finish in time")
  return time.perf_counter() - start


def measure(repeats: int) -> dict:
  model, tok, params = _model_and_tokenizer()
  grpo, fns, state = _setup("grpo", model, tok, num_generations=GENERATIONS,
                            max_completion_tokens=REPLY, rewards=("exact_match", "format"),
                            format_regex=r"[A-Z][A-Z' -]* speaks first\.")
  if params is not None:
    state = state.replace(params=jax.device_put(params))
  train, _ = grpo.datasets(type("D", (), {"seq_len": SEQ})(), tok, model, 0)
  grpo.precompute((), fns.eval_model, jax.device_get(state.params))
  update, holder = _stepper(fns, state)
  sft, sft_fns, sft_state = _setup("sft", model, tok)
  sft_update, _ = _stepper(sft_fns, sft_state)
  rng = np.random.default_rng(0)
  ones = np.ones((ROWS, SEQ), np.int32)
  sft_batch = {"tokens": rng.integers(7, model.vocab_size, (ROWS, SEQ)).astype(np.int32),
               "segment_ids": ones, "loss_mask": ones, "weights": np.ones(ROWS, np.float32),
               "positions": np.broadcast_to(np.arange(SEQ, dtype=np.int32), (ROWS, SEQ)).copy()}
  best = {k: float("inf") for k in ("rollout", "update", "sft", "served")}
  tokens = 0
  for step in range(repeats + 1):  # the first: compilation
    train.bind(holder[0].params)
    t = time.perf_counter()
    batch = train.batch(step, ROWS)
    rollout = time.perf_counter() - t
    tokens = int(batch["completion_length"].sum())
    seconds = {"rollout": rollout, "update": update(batch), "sft": sft_update(sft_batch),
               "served": _serve_same(train, holder[0].params, step)}
    if step:
      best = {k: min(best[k], v) for k, v in seconds.items()}
  return _report(best, tokens, model)


def _serve_same(train, params, step: int) -> float:
  """The rollout's requests (same prompts, seeds, sampling) served by a started engine."""
  from lmjax.inference.engine import Engine, Request
  sampler = train.sampler
  if not hasattr(sampler, "served"):
    sampler.served = Engine(sampler.model, params, sampler.pad, slots=ROWS, max_len=SEQ,
                            steps_per_dispatch=REPLY).start()
  sampler.served.update_params(params)
  from lmjax.data.permutation import epoch_order
  from lmjax.rollouts import _seed
  ids = np.repeat(epoch_order(step * GROUPS, GROUPS, train.num_examples, train.seed), GENERATIONS)
  requests = [Request(list(train.prompts[i].ids), REPLY, lambda e: None, temperature=1.0,
                      seed=_seed(train.seed, step, row), token_logprobs=False,
                      stop_ids=sampler.stop_ids) for row, i in enumerate(ids)]
  seconds = _served(sampler.served, requests)
  return seconds


def _report(best: dict, tokens: int, model) -> dict:
  grpo_step = best["rollout"] + best["update"]
  return {"shape": f"d{model.d_model} L{model.num_layers} seq {SEQ}, {GROUPS} prompts x "
                   f"{GENERATIONS} replies <= {REPLY} tokens",
          "rollout_s": best["rollout"], "update_s": best["update"], "grpo_step_s": grpo_step,
          "generation_share": best["rollout"] / grpo_step,
          "update_share": best["update"] / grpo_step, "rollout_tokens": tokens,
          "rollout_tokens_per_s": tokens / best["rollout"],
          "served_tokens_per_s": tokens / best["served"],
          "rollout_vs_served": best["served"] / best["rollout"],
          "sft_step_s": best["sft"], "grpo_step_vs_sft": grpo_step / best["sft"],
          "grpo_update_vs_sft": best["update"] / best["sft"]}


def held_out(run: str) -> dict:
  """The held-out rewards of `run`'s greedy replies, as a grpo_tiny run evaluates them."""
  import importlib
  from lmjax import pretrained
  from lmjax.experiment import experiment_from_dict
  from lmjax.loop import evaluate
  from lmjax.steps import eval_step
  module = importlib.import_module("experiments.grpo_tiny")
  exp = experiment_from_dict(module.get_config(FLAGS.variant).to_dict())
  source = pretrained.load(run)
  model = source.model.replace(dropout_rate=0.0)
  objective = objectives.build(exp.objective, source.tokenizer.special, model.vocab_size,
                               exp.task)
  _, data = objective.datasets(exp.data, source.tokenizer, model, exp.train.seed)
  fns = train_lib.step_fns(model, objective)
  objective.precompute((), fns.eval_model, source.params)
  fake = type("Run", (), {"exp": exp, "eval_data": data, "fns": fns})()
  out = evaluate(jax.jit(functools.partial(eval_step, fns)), source.params, fake, lambda b: b)
  return {"run": run, **out}


def main(argv: list[str]) -> None:
  del argv
  global GROUPS, GENERATIONS, ROWS
  if FLAGS.tiny:
    GROUPS, GENERATIONS = 2, 2
    ROWS = GROUPS * GENERATIONS
  if FLAGS.held_out:
    for run in FLAGS.held_out:
      print(json.dumps(held_out(run)))
    return
  out = measure(1 if FLAGS.tiny else 2 if FLAGS.quick else 5)
  for k, v in out.items():
    print(f"{k:>22}: {v:.4g}" if isinstance(v, float) else f"{k:>22}: {v}")
  if FLAGS.json:
    with open(FLAGS.json, "w") as f:
      json.dump(out, f, indent=2)


if __name__ == "__main__":
  app.run(main)
