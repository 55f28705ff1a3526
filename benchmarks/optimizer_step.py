"""Each registered optimizer's cost on the same model: the whole train step, the update alone,
and the optimizer state's memory (part of benchmarks.optimizers; `run()` prints a table).

Candidates are timed interleaved (`benchmarks.train_step.time_interleaved`, the minimum of
the repeats), so the machine's drift hits them alike.
"""

from __future__ import annotations

import functools

import jax
import optax

from benchmarks.train_step import SPECIAL, Shape, _batch, time_interleaved
from lmjax import objectives
from lmjax import train as train_lib
from lmjax.optim import OptimizerConfig, registered, state_bytes

SHAPES = {"clm_tiny (d128 x 4, vocab 2048, 32 x 128)": Shape("clm", 128, 4, 128, 32, vocab=2048,
                                                                heads=4),
          "d512 x 4, vocab 4096, 8 x 256": Shape("clm", 512, 4, 256, 8)}
QUICK = {"d128 x 2, vocab 2048, 4 x 32": Shape("clm", 128, 2, 32, 4, vocab=2048, heads=2)}


def candidates(shape: Shape, kind: str, steps: int):
  """(train step callable, update-only callable, state bytes, parameter bytes)."""
  cfg = shape.model()
  fns = train_lib.step_fns(cfg, objectives.build(objectives.objective_class("clm").config_class(
      kind="clm"), SPECIAL, cfg.vocab_size), OptimizerConfig(kind=kind, warmup_steps=0), 1000)
  state = jax.jit(lambda: train_lib.unbox(train_lib.init_state(fns, 0, (1, 8))))()
  step = jax.jit(functools.partial(train_lib.train_step, fns), donate_argnums=(0,))
  batch = jax.device_put(_batch(shape))
  grads = jax.tree.map(lambda p: p * 1e-3, state.params)

  @functools.partial(jax.jit, donate_argnums=(0, 1))
  def update(params, opt_state):
    updates, opt_state = fns.tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  total = state_bytes(state.opt_state)[0]
  params = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(state.params))
  box = [state]
  box_u = [jax.tree.map(lambda x: x.copy(), (state.params, state.opt_state))]

  def run_step():
    for _ in range(steps):
      box[0], metrics = step(box[0], batch)
    jax.block_until_ready(metrics)

  def run_update():
    for _ in range(steps):
      box_u[0] = update(*box_u[0])
    jax.block_until_ready(box_u[0])
  return run_step, run_update, total, params


def run(quick: bool = False) -> dict:
  kinds = [k for k in registered()]
  out = {}
  steps, repeats = (2, 3) if quick else (3, 7)
  for name, shape in (QUICK if quick else SHAPES).items():
    built = {kind: candidates(shape, kind, steps) for kind in kinds}
    times = time_interleaved({f"{k}/{part}": fn for k, (s, u, _, _) in built.items()
                              for part, fn in (("step", s), ("update", u))}, repeats)
    rows = out[name] = {}
    print(f"  {name}: {'optimizer':21s} {'step ms':>8s} {'update ms':>9s} {'vs adamw':>8s} "
          f"{'state MiB':>9s} {'bytes/param':>11s}")
    for kind, (_, _, state, params) in built.items():
      step_ms, update_ms = (times[f"{kind}/{p}"][0] / steps * 1e3 for p in ("step", "update"))
      rows[kind] = {"step_ms": step_ms, "update_ms": update_ms, "state_bytes": state,
                    "bytes_per_param": state / params * 4}
    for kind, r in rows.items():
      r["step_vs_adamw"] = r["step_ms"] / rows["adamw"]["step_ms"]
      print(f"  {'':{len(name)}s}  {kind:21s} {r['step_ms']:8.1f} {r['update_ms']:9.2f} "
            f"{r['step_vs_adamw']:7.2f}x {r['state_bytes'] / 2**20:9.2f} "
            f"{r['bytes_per_param']:11.2f}", flush=True)
  return out
