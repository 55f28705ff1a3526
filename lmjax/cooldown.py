"""Cooldowns branched from a stable run: `train.branch_from=RUN:STEP`.

A warmup-stable-decay schedule (`optimizer.schedule=wsd`) is the peak learning rate
until its decay starts, exactly as a `constant` schedule is. So one long stable run
(`schedule=constant`, or `wsd` whose decay starts later) can be cooled down from any of
its checkpoints: a new run in its own workdir starts from the stable run's whole state
at STEP (parameters, optimizer state, step, rng) and trains to its own `train.steps`
with its own schedule, typically `schedule=wsd` and `decay_start=STEP`. Batches and
dropout are functions of (seed, step), so the branch ends bit for bit where an
uninterrupted wsd run with that decay start ends (tested).

Checked before anything is written: the source run has a checkpoint at STEP of the
same architecture, tokenizer and optimizer kind, STEP is before `train.steps`, and
the two schedules give the same learning rate at every step before STEP (a branch
taken from inside the source's own decay would not be a cooldown of its stable
phase). Other settings may differ (a cooldown on other data is a branch too), at the
price of that equality. The branch only reads the source; resuming the branch
resumes from its own checkpoints.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from absl import logging

from lmjax import paths
from lmjax.checkpoint import Checkpointer
from lmjax.errors import UserError
from lmjax.experiment import Experiment, architecture, section_from_dict
from lmjax.optim import learning_rate_schedule, optimizer_options


def parse_branch(spec: str) -> tuple[str, int]:
  """'RUN:STEP' -> (the run directory or bucket URL, STEP)."""
  run, sep, step = spec.rpartition(":")
  if not sep or not run or not step.isdigit() or int(step) < 1:
    raise UserError(f"train.branch_from must be RUN:STEP (a run directory and one of its "
                    f"checkpoint steps, e.g. runs/stable:400), got {spec!r}")
  return paths.resolve(run), int(step)


def source_meta(exp: Experiment) -> dict[str, Any]:
  """The metadata of the source checkpoint, every check of the branch made against it."""
  spec = exp.train.branch_from
  run, step = parse_branch(spec)
  if not paths.isdir(paths.join(run, "checkpoints")):
    raise UserError(f"train.branch_from={spec}: {run} holds no checkpoints")
  ckpt = Checkpointer(run, read_only=True)
  try:
    steps = ckpt.all_steps()
    if step not in steps:
      raise UserError(f"train.branch_from={spec}: {run} has no checkpoint at step {step} "
                      f"(it has {', '.join(map(str, sorted(steps))) or 'none'}; keep more with "
                      "train.keep_checkpoints)")
    meta = ckpt.read_meta(step)
  finally:
    ckpt.close()
  if step >= exp.train.steps:
    raise UserError(f"train.branch_from={spec}: train.steps={exp.train.steps} must be past the "
                    f"branch step {step}")
  check_compatible(exp, meta["config"], spec, step)
  return meta


def check_compatible(exp: Experiment, source: dict[str, Any], spec: str, step: int) -> None:
  """The source run's config against this run's: architecture, optimizer kind and the
  learning rate before the branch step."""
  if architecture(source["model"]) != architecture(exp.to_dict()["model"]):
    raise UserError(f"train.branch_from={spec}: the source run has another architecture")
  theirs = section_from_dict("optimizer", *optimizer_options(source.get("optimizer", {})))
  if theirs.kind != exp.optimizer.kind:
    raise UserError(f"train.branch_from={spec}: the source run trains with optimizer.kind="
                    f"{theirs.kind}, this one with {exp.optimizer.kind}")
  counts = np.arange(step)
  mine = np.asarray(jax.vmap(learning_rate_schedule(exp.optimizer, exp.train.steps))(counts))
  before = np.asarray(jax.vmap(learning_rate_schedule(
      theirs, source.get("train", {}).get("steps", exp.train.steps)))(counts))
  differ = np.flatnonzero(mine != before)
  if differ.size:
    s = int(differ[0])
    raise UserError(f"train.branch_from={spec}: the learning rate before step {step} differs "
                    f"from the source run's (step {s + 1}: {mine[s]:.6g} here, {before[s]:.6g} "
                    "there); branch from its stable phase, with the same warmup and peak")


def restore_branch(exp: Experiment, target: Any, tokenizer_sha: str) -> Any:
  """The source run's whole train state at the branch step, onto `target`'s shardings."""
  meta = source_meta(exp)
  if meta.get("tokenizer_sha256") not in (None, tokenizer_sha):
    raise UserError(f"train.branch_from={exp.train.branch_from}: the source run was trained "
                    "with another tokenizer")
  run, step = parse_branch(exp.train.branch_from)
  ckpt = Checkpointer(run, read_only=True)
  try:
    state, _ = ckpt.restore(step, target)
  except Exception as e:  # noqa: BLE001  (orbax reports a mismatched tree in many types)
    raise UserError(f"train.branch_from={exp.train.branch_from}: its state does not restore "
                    f"into this run's ({type(e).__name__}: {str(e).splitlines()[0][:200]}); "
                    "the optimizer's options must shape its state alike") from None
  finally:
    ckpt.close()
  logging.info("branched from %s step %d", run, step)
  return state
