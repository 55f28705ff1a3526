"""Fine-tuning a pretrained backbone for sequence classification or extractive QA.

The architecture and tokenizer come from `init_from` (an lmjax run or a Hugging
Face directory); `train.init="random"` keeps the architecture but not the
weights, the baseline a pretrained start must beat. Batches are a function of
(seed, step), checkpoints go to WORKDIR/checkpoints, and a run resumes like
pretraining does.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging

from lmjax import pretrained
from lmjax.checkpoint import Checkpointer
from lmjax.data import genres, tasks
from lmjax.errors import UserError
from lmjax.experiment import section_from_dict
from lmjax.metrics import MetricsWriter
from lmjax.model import SequenceClassifier, SpanExtractor
from lmjax.optim import OptimizerConfig, make_optimizer
from lmjax.train import unbox


@dataclasses.dataclass(frozen=True)
class TaskConfig:
  kind: str = "classification"  # classification | qa
  dataset: str = ""  # built-in dataset ("shakespeare_genre"), else train_file/eval_file
  train_file: str = ""  # JSON lines, see lmjax/data/tasks.py
  eval_file: str = ""
  labels: tuple[str, ...] = ()  # class names (classification)
  seq_len: int = 128
  dropout_rate: float = 0.1

  def __post_init__(self):
    if self.kind not in ("classification", "qa"):
      raise ValueError(f"task.kind must be 'classification' or 'qa', got {self.kind!r}")
    if self.dataset not in ("", "shakespeare_genre"):
      raise ValueError(f"task.dataset {self.dataset!r} is unknown (known: shakespeare_genre)")


@dataclasses.dataclass(frozen=True)
class FinetuneTrainConfig:
  steps: int = 300
  batch_size: int = 32
  seed: int = 0
  init: str = "pretrained"  # pretrained | random (same architecture, fresh weights)
  log_every: int = 20
  eval_every: int = 100  # 0: only at the end
  eval_batch_size: int = 64

  def __post_init__(self):
    if self.init not in ("pretrained", "random"):
      raise ValueError(f"train.init must be 'pretrained' or 'random', got {self.init!r}")


@dataclasses.dataclass(frozen=True)
class FinetuneExperiment:
  task: TaskConfig
  optimizer: OptimizerConfig
  train: FinetuneTrainConfig

  def to_dict(self) -> dict[str, Any]:
    return json.loads(json.dumps(dataclasses.asdict(self)))


_SECTIONS = {"task": TaskConfig, "optimizer": OptimizerConfig, "train": FinetuneTrainConfig}


def finetune_from_dict(config: Mapping[str, Any]) -> FinetuneExperiment:
  unknown = sorted(set(config) - set(_SECTIONS))
  if unknown:
    raise UserError(f"unknown config section(s) {', '.join(unknown)} (known: {', '.join(_SECTIONS)})")
  return FinetuneExperiment(**{n: section_from_dict(n, c, config.get(n, {}))
                               for n, c in _SECTIONS.items()})


def default_finetune_config() -> dict[str, Any]:
  return {name: dataclasses.asdict(cls()) for name, cls in _SECTIONS.items()}


def load_task_data(task: TaskConfig, source: pretrained.Pretrained
                   ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], tuple[str, ...]]:
  """(train arrays, eval arrays, label names) encoded with the source's tokenizer."""
  if task.seq_len > source.model.max_len:
    raise UserError(f"task.seq_len={task.seq_len} exceeds the model's max_len={source.model.max_len}")
  family, tok = source.model.family, source.tokenizer
  if task.kind == "qa":
    if not (task.train_file and task.eval_file):
      raise UserError("a QA task needs task.train_file and task.eval_file")
    read = lambda p: tasks.encode_qa(tok, tasks.read_qa(p), task.seq_len, family)
    return read(task.train_file), read(task.eval_file), ()
  if task.dataset == "shakespeare_genre":
    labels = genres.LABELS
    train, held_out = genres.genre_examples("train"), genres.genre_examples("eval")
  elif task.train_file and task.eval_file and task.labels:
    labels = task.labels
    train = tasks.read_classification(task.train_file, labels)
    held_out = tasks.read_classification(task.eval_file, labels)
  else:
    raise UserError("set task.dataset, or task.train_file, task.eval_file and task.labels")
  encode = lambda ex: tasks.encode_classification(tok, ex, task.seq_len, family)
  return encode(train), encode(held_out), tuple(labels)


def task_model(exp: FinetuneExperiment, source: pretrained.Pretrained, num_labels: int,
               deterministic: bool) -> nn.Module:
  cfg = source.model.replace(dropout_rate=exp.task.dropout_rate, remat_policy="none")
  if exp.task.kind == "qa":
    return SpanExtractor(cfg, deterministic)
  return SequenceClassifier(cfg, num_labels, deterministic)


def task_loss(model: nn.Module, params: Any, batch: dict[str, jax.Array], rng: jax.Array | None
              ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Mean cross-entropy and the number of exactly right predictions in the batch."""
  rngs = {"dropout": rng} if rng is not None else {}
  out = model.apply({"params": params}, batch["tokens"], batch["segment_ids"],
                    batch["token_types"], rngs=rngs)
  ce = optax.softmax_cross_entropy_with_integer_labels
  if "labels" in batch:
    loss = ce(out, batch["labels"])
    correct = jnp.argmax(out, -1) == batch["labels"]
  else:  # QA: start and end; right only if both are
    start, end = out
    loss = (ce(start, batch["starts"]) + ce(end, batch["ends"])) / 2
    correct = (jnp.argmax(start, -1) == batch["starts"]) & (jnp.argmax(end, -1) == batch["ends"])
  weight = batch["weight"]
  return (jnp.sum(loss * weight) / jnp.maximum(jnp.sum(weight), 1.0),
          {"loss_sum": jnp.sum(loss * weight), "correct": jnp.sum(correct * weight),
           "count": jnp.sum(weight)})


def _rows(data: dict[str, np.ndarray], idx: np.ndarray, valid: np.ndarray | None = None
          ) -> dict[str, np.ndarray]:
  out = {k: v[idx] for k, v in data.items()}
  out["weight"] = np.ones(len(idx), np.float32) if valid is None else valid.astype(np.float32)
  return out


def train_batch(data: dict[str, np.ndarray], step: int, batch_size: int, seed: int
                ) -> dict[str, np.ndarray]:
  """Rows of `step`: a fresh permutation of the examples per epoch, from (seed, epoch)."""
  n = len(next(iter(data.values())))
  first = step * batch_size
  idx = [np.random.default_rng([seed, e]).permutation(n)[i]
         for e, i in (divmod(j, n) for j in range(first, first + batch_size))]
  return _rows(data, np.asarray(idx))


def evaluate_task(eval_fn, params: Any, data: dict[str, np.ndarray], batch_size: int
                  ) -> dict[str, float]:
  n = len(next(iter(data.values())))
  totals = np.zeros(3)
  for start in range(0, n, batch_size):
    idx = np.arange(start, start + batch_size)
    valid = idx < n  # the last batch is padded with weight-0 copies of row 0
    sums = eval_fn(params, _rows(data, np.where(valid, idx, 0), valid))
    totals += [float(sums["loss_sum"]), float(sums["correct"]), float(sums["count"])]
  return {"loss": totals[0] / totals[2], "accuracy": totals[1] / totals[2],
          "examples": totals[2]}


def finetune(exp: FinetuneExperiment, init_from: str, workdir: str) -> dict[str, float]:
  """Trains the task head (and backbone) in `workdir`; returns the final eval metrics."""
  if not init_from:
    raise UserError("--init_from is required: the run or Hugging Face directory to start from")
  t = exp.train
  source = pretrained.load(init_from)
  train_data, eval_data, labels = load_task_data(exp.task, source)
  model = task_model(exp, source, len(labels), deterministic=exp.task.dropout_rate == 0)
  eval_model = task_model(exp, source, len(labels), deterministic=True)
  tx = make_optimizer(exp.optimizer, t.steps)
  sample = _rows(train_data, np.arange(1))
  fresh = eval_model.init(jax.random.PRNGKey(t.seed), sample["tokens"], sample["segment_ids"],
                          sample["token_types"])["params"]
  fresh = unbox(fresh)
  if t.init == "pretrained":
    head = lambda name: name.startswith(("classifier/", "span/"))
    fresh = pretrained.merge_params(fresh, source.params, init_from, may_be_new=head)
  state = {"step": jnp.int32(0), "params": fresh, "opt_state": tx.init(fresh)}
  ckpt = Checkpointer(workdir, keep=1)
  writer = MetricsWriter(workdir)
  try:
    if ckpt.latest_step() is not None:
      target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(
          x.shape, x.dtype, sharding=jax.sharding.SingleDeviceSharding(jax.devices()[0])), state)
      state, _ = ckpt.restore(ckpt.latest_step(), target)
      logging.info("resumed from step %d", int(state["step"]))
    return _loop(exp, state, model, eval_model, tx, train_data, eval_data, ckpt, writer,
                 {"config": exp.to_dict(), "init_from": init_from, "labels": list(labels),
                  "model": dataclasses.asdict(source.model)})
  finally:
    ckpt.close()
    writer.close()


def _loop(exp, state, model, eval_model, tx, train_data, eval_data, ckpt, writer, meta):
  t = exp.train

  @functools.partial(jax.jit, donate_argnums=(0,))
  def train_step(state, batch):
    rng = jax.random.fold_in(jax.random.PRNGKey(t.seed + 1), state["step"])
    grads, sums = jax.grad(lambda p: task_loss(model, p, batch, rng), has_aux=True)(
        state["params"])
    updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
    new = {"step": state["step"] + 1, "params": optax.apply_updates(state["params"], updates),
           "opt_state": opt_state}
    return new, {"loss": sums["loss_sum"] / sums["count"], "accuracy": sums["correct"] / sums["count"]}

  eval_fn = jax.jit(lambda p, b: task_loss(eval_model, p, b, None)[1])
  step, metrics, pending = int(state["step"]), {}, []
  while step < t.steps:
    state, m = train_step(state, train_batch(train_data, step, t.batch_size, t.seed))
    step += 1
    pending.append(m)
    if step % t.log_every == 0 or step == t.steps:
      fetched = jax.device_get(pending)
      writer.write(step, "train", {k: np.mean([f[k] for f in fetched]) for k in fetched[0]},
                   t.steps)
      pending = []
    if (t.eval_every and step % t.eval_every == 0) or step == t.steps:
      metrics = evaluate_task(eval_fn, state["params"], eval_data, t.eval_batch_size)
      writer.write(step, "eval", metrics, t.steps)
      ckpt.save(step, state, {**meta, "step": step})
  if not metrics:
    metrics = evaluate_task(eval_fn, state["params"], eval_data, t.eval_batch_size)
  result = {**metrics, "steps": step, "init": t.init, "init_from": meta["init_from"]}
  with open(os.path.join(os.path.dirname(ckpt.directory), "results.json"), "w") as f:
    json.dump(result, f, indent=2)
  return result
