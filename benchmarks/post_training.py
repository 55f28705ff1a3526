"""Post-training costs against pretraining, in one run, on this machine.

  python -m benchmarks.post_training [--quick] [--json OUT] [--layers 4]
      [--sft_run runs/chat_tiny --dpo_run runs/dpo_tiny]

- SFT tokens/s against CLM pretraining tokens/s at the same shape (clm_tiny's: d128,
  4 layers, seq 256, batch 16), candidates interleaved, minimum of the repeats
  (target: >= 0.95x);
- packing efficiency of experiments/data/chat_train.jsonl at seq 256: the share of
  real tokens per row and the share of loss (assistant) tokens;
- a DPO step (B pairs: 2B rows) against an SFT step of the same 2B rows (target: <= 2.2x);
- --tiny (the tests: seq 160, batch 2, one repeat) with --layers 1: a smoke run of one layer;
- with --sft_run/--dpo_run: held-out preference accuracy (chosen more likely than
  rejected) of the SFT model and of the DPO model, and the DPO reward accuracy.
"""

from __future__ import annotations

import functools
import json
import os
import time

import jax
import numpy as np
from absl import app, flags

from lmjax import objectives
from lmjax import train as train_lib
from lmjax.data import BUNDLED_DIR, Tokenizer, chat
from lmjax.data.examples import TaskConfig
from lmjax.model import TransformerConfig
from lmjax.optim import OptimizerConfig
from lmjax.sharding import unbox

flags.DEFINE_bool("quick", False, "fewer repeats")
flags.DEFINE_bool("tiny", False, "seq 160, batch 2, one repeat: checks that it runs (tests)")
flags.DEFINE_integer("layers", 4, "model depth (clm_tiny's: 4; a smoke run: 1)", lower_bound=1)
flags.DEFINE_string("json", "", "write the figures here")
flags.DEFINE_string("sft_run", "", "a chat_tiny run: its preference accuracy before DPO")
flags.DEFINE_string("dpo_run", "", "a dpo_tiny run: its preference accuracy after DPO")
FLAGS = flags.FLAGS

DATA = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "experiments",
                    "data")
SEQ, BATCH = 256, 16


def _fns(kind: str, model: TransformerConfig, tok: Tokenizer, task=None):
  cfg = objectives.objective_class(kind).config_class(kind=kind)
  objective = objectives.build(cfg, tok.special, model.vocab_size, task)
  opt = OptimizerConfig(learning_rate=1e-3, warmup_steps=0)
  return train_lib.step_fns(model.replace(dropout_rate=0.0), objective, opt, 100), objective


def _timer(fns, batch):
  """A function timing `steps` train steps on `batch` (compiled first)."""
  state = jax.jit(lambda: unbox(train_lib.init_state(fns, 0, (1, SEQ))))()
  step = jax.jit(functools.partial(train_lib.train_step, fns), donate_argnums=(0,))
  holder = [state]
  holder[0], metrics = step(holder[0], batch)
  jax.block_until_ready(metrics)

  def run(steps: int) -> float:
    start = time.perf_counter()
    for _ in range(steps):
      holder[0], metrics = step(holder[0], batch)
    jax.block_until_ready(metrics)
    return (time.perf_counter() - start) / steps
  return run


def _interleaved(timers: dict, repeats: int, steps: int) -> dict[str, float]:
  best = {k: float("inf") for k in timers}
  for _ in range(repeats):
    for name, run in timers.items():
      best[name] = min(best[name], run(steps))
  return best


def step_costs(quick: bool) -> dict:
  tok = Tokenizer(os.path.join(BUNDLED_DIR, "tokenizer.model"))
  model = TransformerConfig(family="decoder", vocab_size=2048, max_len=SEQ, d_model=128,
                            num_layers=FLAGS.layers, num_heads=4, d_ff=512, scan_layers=False,
                            dtype="float32")
  rng = np.random.default_rng(0)
  task = TaskConfig()
  packed = chat.pack_conversations(os.path.join(DATA, "chat_train.jsonl"), tok,
                                   chat.load_template(tok), SEQ, "newest")
  rows = {k: v[:2 * BATCH] for k, v in packed.arrays.items()}
  sft_batch = lambda n: {**{k: v[:n] for k, v in rows.items()},
                         "weights": np.ones(n, np.float32)}
  clm_batch = {"tokens": rng.integers(7, 2048, (BATCH, SEQ)).astype(np.int32),
               "segment_ids": np.ones((BATCH, SEQ), np.int32),
               "positions": np.broadcast_to(np.arange(SEQ, dtype=np.int32), (BATCH, SEQ)).copy()}
  pairs = chat.preference_rows(os.path.join(DATA, "dpo_train.jsonl"), tok,
                               chat.load_template(tok), SEQ, "drop").arrays
  dpo_batch = {**{k: v[:BATCH] for k, v in pairs.items()}, "weights": np.ones(BATCH, np.float32),
               "ref_chosen": np.zeros(BATCH, np.float32),
               "ref_rejected": np.zeros(BATCH, np.float32)}
  timers = {"clm": _timer(_fns("clm", model, tok)[0], clm_batch),
            "sft": _timer(_fns("sft", model, tok, task)[0], sft_batch(BATCH)),
            "sft_2b": _timer(_fns("sft", model, tok, task)[0], sft_batch(2 * BATCH)),
            "dpo": _timer(_fns("dpo", model, tok, task)[0], dpo_batch)}
  best = _interleaved(timers, 1 if FLAGS.tiny else 3 if quick else 7, 2 if quick else 4)
  tokens = BATCH * SEQ
  return {"shape": f"d128 L{FLAGS.layers} seq {SEQ} batch {BATCH}",
          "clm_tokens_per_s": tokens / best["clm"], "sft_tokens_per_s": tokens / best["sft"],
          "sft_vs_clm_tokens_per_s": best["clm"] / best["sft"],
          "packing_real_share": packed.real_share, "packing_loss_share": packed.loss_share,
          "dpo_step_s": best["dpo"], "sft_step_same_rows_s": best["sft_2b"],
          "dpo_vs_sft_step": best["dpo"] / best["sft_2b"]}


def preference_accuracy(run: str) -> dict:
  """Held-out pairs where the run's model gives the chosen completion more log-probability
  than the rejected one (no reference involved)."""
  from lmjax import pretrained
  from lmjax.objectives.chat import _completion_logps
  source = pretrained.load(run)
  tok = source.tokenizer
  pairs = chat.preference_rows(os.path.join(DATA, "dpo_eval.jsonl"), tok,
                               chat.load_template(tok), SEQ, "drop").arrays
  model = objectives.SFT(objectives.SFTConfig(), tok.special,
                         source.model.vocab_size).build_model(source.model, True)
  logps = jax.jit(lambda p, *a: _completion_logps(model, p, *a))
  side = {s: np.asarray(logps(source.params, *(pairs[f"{s}_{k}"] for k in
                                                ("tokens", "segment_ids", "positions",
                                                 "loss_mask"))))
          for s in ("chosen", "rejected")}
  return {"run": run, "pairs": int(len(side["chosen"])),
          "chosen_more_likely": float(np.mean(side["chosen"] > side["rejected"]))}


def main(argv: list[str]) -> None:
  del argv
  global SEQ, BATCH
  if FLAGS.tiny:
    SEQ, BATCH = 160, 2
  out = {"steps": step_costs(FLAGS.quick or FLAGS.tiny)}
  s = out["steps"]
  print(f"post-training at {s['shape']}, float32, this machine:")
  print(f"  SFT {s['sft_tokens_per_s']:,.0f} tok/s vs CLM {s['clm_tokens_per_s']:,.0f} tok/s: "
        f"{s['sft_vs_clm_tokens_per_s']:.2f}x (target >= 0.95x: "
        f"{'met' if s['sft_vs_clm_tokens_per_s'] >= 0.95 else 'missed'})")
  print(f"  packing chat_train at seq {SEQ}: {100 * s['packing_real_share']:.1f}% real tokens, "
        f"{100 * s['packing_loss_share']:.1f}% loss tokens")
  print(f"  DPO step {1e3 * s['dpo_step_s']:.1f} ms vs SFT step of the same rows "
        f"{1e3 * s['sft_step_same_rows_s']:.1f} ms: {s['dpo_vs_sft_step']:.2f}x (target <= 2.2x: "
        f"{'met' if s['dpo_vs_sft_step'] <= 2.2 else 'missed'})")
  for name, run in (("before_dpo", FLAGS.sft_run), ("after_dpo", FLAGS.dpo_run)):
    if run:
      out[name] = preference_accuracy(run)
      print(f"  {name}: chosen more likely than rejected on {out[name]['pairs']} held-out "
            f"pairs: {100 * out[name]['chosen_more_likely']:.1f}%")
  if FLAGS.dpo_run:
    result = json.load(open(os.path.join(FLAGS.dpo_run, "results.json")))
    out["dpo_results"] = result
    print(f"  dpo_tiny held-out reward accuracy {100 * result['reward_accuracy']:.1f}%, margin "
          f"{result['reward_margin']:.3f}")
  if FLAGS.json:
    with open(FLAGS.json, "w") as f:
      json.dump(out, f, indent=2)


if __name__ == "__main__":
  app.run(main)
