"""Objectives that train a task head on a pretrained backbone: classification and
regression of a text or a text pair (GLUE-style), and extractive QA.

Their examples come from the run's `task` section (`lmjax.data.examples.TaskConfig`:
files, labels), encoded with the pretrained model's tokenizer at `data.seq_len`; a
task's batches are labelled examples, and its held-out measures are the ones the
field reports.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from lmjax.errors import UserError
from lmjax.model.moe import apply_with_router_stats, router_sums
from lmjax.objectives.base import Batch, Objective, ObjectiveConfig, register

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class QAConfig(ObjectiveConfig):
  kind: str = "qa"
  # Context windows overlap by doc_stride tokens (0: data.seq_len // 4); answers of at most
  # max_answer_tokens from the n_best starts and ends; SQuAD 2.0: "no answer" when the
  # null score beats the best span by more than null_threshold.
  doc_stride: int = 0
  max_answer_tokens: int = 30
  n_best: int = 20
  null_threshold: float = 0.0

  def __post_init__(self):
    super().__post_init__()
    if self.doc_stride < 0 or self.max_answer_tokens < 1 or self.n_best < 1:
      raise ValueError("objective.doc_stride must be >= 0, objective.max_answer_tokens and "
                       "objective.n_best >= 1")


class Task(Objective):
  """Labelled examples through a task head; `weight` counts examples, not tokens."""

  fine_tunes = True
  head = "classifier/"  # where the new head's parameters live

  def datasets(self, data: Any, tokenizer: Any, model: Any, seed: int):
    from lmjax.data.examples import ExampleDataset
    train, held_out = self.examples(tokenizer, model.family, data.seq_len)
    return ExampleDataset(train, seed), ExampleDataset(held_out, seed)

  def examples(self, tokenizer: Any, family: str, seq_len: int
               ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """(train, eval) arrays encoded with the pretrained model's tokenizer."""
    raise NotImplementedError

  def is_new_param(self, name: str) -> bool:
    return name.startswith(self.head)

  targets_spec = {"labels": ((), np.int32)}  # what each example is labelled with

  def batch_spec(self, seq_len: int) -> dict[str, tuple[tuple[int, ...], Any]]:
    row = {k: ((seq_len,), np.int32) for k in ("tokens", "segment_ids", "token_types")}
    return {**row, **self.targets_spec, "weights": ((), np.float32)}

  def loss_sums(self, model: nn.Module, params: Any, batch: Batch,
                rngs: dict[str, Array]) -> dict[str, Array]:
    out, router = apply_with_router_stats(model, {"params": params}, batch["tokens"],
                                          batch["segment_ids"], batch["token_types"], rngs=rngs)
    return router_sums(self.sums(out, batch), router, model.cfg)  # + a router's losses

  def eval_sums(self, model: nn.Module, params: Any, batch: Batch) -> dict[str, Array]:
    out = model.apply({"params": params}, batch["tokens"], batch["segment_ids"],
                      batch["token_types"])
    return {**self.sums(out, batch), "predictions": self.predict(out),
            "targets": self.targets(batch), "examples": batch["weights"]}

  def sums(self, out: Any, batch: Batch) -> dict[str, Array]:
    """Summed terms shaped like `cross_entropy_sums`' from per-example loss and hits."""
    loss, correct = self.example_terms(out, batch)
    weight = batch["weights"]  # (B,) 1 for examples, 0 for padding rows
    total = jnp.sum(loss * weight)
    return {"loss": total, "objective": total, "correct": jnp.sum(correct * weight),
            "weight": jnp.sum(weight)}

  def example_terms(self, out: Any, batch: Batch) -> tuple[Array, Array]:
    raise NotImplementedError

  def predict(self, out: Any) -> Array:
    return jnp.argmax(out, -1)

  def targets(self, batch: Batch) -> Array:
    return batch["labels"]

  def eval_metrics(self, sums: dict[str, float], examples: dict[str, np.ndarray]
                   ) -> dict[str, float]:
    metrics = {k: float(v) for k, v in self.metrics(sums).items()}
    keep = examples["examples"] > 0
    result = {"loss": metrics["loss"], "examples": float(keep.sum()),
              "accuracy": metrics["accuracy"]}
    result.update(self.measures(examples["predictions"][keep], examples["targets"][keep]))
    return result

  def measures(self, predictions: np.ndarray, targets: np.ndarray) -> dict[str, float]:
    return {}

  @classmethod
  def head_positions(cls, cfg: ObjectiveConfig, seq_len: int) -> int:
    return 0  # a task head's cost is negligible


class _Labelled(Task):
  """A text or a text pair with a label: the JSON lines of `lmjax.data.examples`, or the
  bundled genre dataset."""

  regression = False

  def label_names(self) -> tuple[str, ...]:
    from lmjax.data import genres
    if self.regression:
      return ()
    return genres.LABELS if self.task.dataset == "shakespeare_genre" else self.task.labels

  def examples(self, tokenizer: Any, family: str, seq_len: int):
    from lmjax.data import examples as tasks
    from lmjax.data import genres
    task, labels = self.task, self.label_names()
    if task.dataset == "shakespeare_genre":
      train, held_out = ([(p, None, label) for p, label in genres.genre_examples(split)]
                         for split in ("train", "eval"))
    elif task.train_file and task.eval_file and (labels or self.regression):
      train, held_out = (tasks.read_labelled(p, labels, self.regression)
                         for p in (task.train_file, task.eval_file))
    else:
      raise UserError("set task.dataset, or task.train_file and task.eval_file (and "
                      "task.labels for classification)")
    encode = lambda ex: tasks.encode_labelled(tokenizer, ex, seq_len, family, self.regression)
    return encode(train), encode(held_out)

  def build_model(self, model: Any, deterministic: bool) -> nn.Module:
    from lmjax.model import SequenceClassifier
    return SequenceClassifier(model, max(len(self.label_names()), 1), deterministic)


@register("classification")
class Classification(_Labelled):
  """Cross-entropy over the task's labels; accuracy, F1 and Matthews correlation."""

  def example_terms(self, out, batch):
    ce = optax.softmax_cross_entropy_with_integer_labels(out, batch["labels"])
    return ce, (jnp.argmax(out, -1) == batch["labels"]).astype(jnp.float32)

  def measures(self, predictions, targets):
    return classification_measures(predictions, targets, len(self.label_names()))


@register("regression")
class Regression(_Labelled):
  """Mean squared error of one output; Pearson, Spearman and MSE."""

  regression = True
  targets_spec = {"labels": ((), np.float32)}

  def example_terms(self, out, batch):
    loss = jnp.square(out[:, 0] - batch["labels"])
    return loss, jnp.zeros_like(loss)

  def predict(self, out):
    return out[:, 0]

  def eval_metrics(self, sums, examples):
    result = super().eval_metrics(sums, examples)
    del result["accuracy"]  # no such thing for a number
    return result

  def measures(self, predictions, targets):
    return regression_measures(predictions, targets)


@register("qa")
class QA(Task):
  """Extractive QA as run_qa does it: long contexts in windows of `data.seq_len` that
  overlap by `objective.doc_stride`, start and end scores per window (position 0: no answer),
  and held-out answers chosen by span search over an example's windows, measured by the
  official SQuAD rules (exact match, F1; for SQuAD 2.0 the HasAns/NoAns split and the
  best null threshold). The answers go to WORKDIR/predictions.json."""

  config_class = QAConfig
  head = "span/"
  targets_spec = {"starts": ((), np.int32), "ends": ((), np.int32)}
  eval_windows: Any = None
  eval_examples: Any = None
  predictions: dict[str, str] = {}

  def examples(self, tokenizer: Any, family: str, seq_len: int):
    from lmjax.data import squad
    task = self.task
    if not (task.train_file and task.eval_file):
      raise UserError("a QA task needs task.train_file and task.eval_file")
    stride = self.cfg.doc_stride or seq_len // 4
    windows = lambda examples: squad.make_windows(examples, tokenizer, seq_len, stride, family)
    train = windows(squad.read_examples(task.train_file))
    self.eval_examples = squad.read_examples(task.eval_file)
    self.eval_windows = windows(self.eval_examples)
    return train.arrays, self.eval_windows.arrays

  def build_model(self, model: Any, deterministic: bool) -> nn.Module:
    from lmjax.model import SpanExtractor
    return SpanExtractor(model, deterministic)

  def example_terms(self, out, batch):
    start, end = out  # (B, T) each
    ce = optax.softmax_cross_entropy_with_integer_labels
    loss = (ce(start, batch["starts"]) + ce(end, batch["ends"])) / 2
    correct = ((jnp.argmax(start, -1) == batch["starts"]) &
               (jnp.argmax(end, -1) == batch["ends"])).astype(jnp.float32)
    return loss, correct

  def eval_sums(self, model: nn.Module, params: Any, batch: Batch) -> dict[str, Array]:
    out = model.apply({"params": params}, batch["tokens"], batch["segment_ids"],
                      batch["token_types"])
    return {**self.sums(out, batch), "start_logits": out[0], "end_logits": out[1],
            "examples": batch["weights"]}

  def eval_metrics(self, sums: dict[str, float], examples: dict[str, np.ndarray]
                   ) -> dict[str, float]:
    from lmjax.data import squad
    metrics = {k: float(v) for k, v in self.metrics(sums).items()}
    rows = int((examples["examples"] > 0).sum())  # eval windows come first, in order
    cfg, v2 = self.cfg, any(e.impossible for e in self.eval_examples)
    self.predictions, odds, _ = squad.best_answers(
        self.eval_windows, examples["start_logits"][:rows], examples["end_logits"][:rows],
        self.eval_examples, cfg.n_best, cfg.max_answer_tokens,
        cfg.null_threshold if v2 else None)
    result = {"loss": metrics["loss"], "accuracy": metrics["accuracy"],  # per window
              "examples": float(len(self.eval_examples)), "windows": float(rows)}
    measured = squad.evaluate(self.eval_examples, self.predictions,
                              odds if v2 else None, cfg.null_threshold)
    result.update(measured)
    return result

  def run_outputs(self) -> dict[str, str]:
    import json
    return {"predictions.json": json.dumps(self.predictions, indent=2, ensure_ascii=False)}


def classification_measures(predictions: np.ndarray, targets: np.ndarray, num_labels: int
                            ) -> dict[str, float]:
  """F1 (binary: of class 1; else macro) and Matthews correlation, as GLUE reports them."""
  f1s = [_f1(predictions == c, targets == c) for c in range(num_labels)]
  return {"f1": f1s[1] if num_labels == 2 else float(np.mean(f1s)),
          "mcc": _matthews(predictions, targets, num_labels)}


def regression_measures(predictions: np.ndarray, targets: np.ndarray) -> dict[str, float]:
  """Pearson and Spearman correlation and MSE, as STS-B reports them."""
  return {"pearson": _pearson(predictions, targets),
          "spearman": _pearson(_ranks(predictions), _ranks(targets)),
          "mse": float(np.mean(np.square(predictions - targets)))}


def _f1(predicted: np.ndarray, actual: np.ndarray) -> float:
  tp = float(np.sum(predicted & actual))
  return 2 * tp / max(float(np.sum(predicted) + np.sum(actual)), 1.0)


def _matthews(predictions: np.ndarray, targets: np.ndarray, num_labels: int) -> float:
  """Gorodkin's multiclass Matthews correlation (the binary MCC for two classes)."""
  c = np.zeros((num_labels, num_labels))
  np.add.at(c, (targets, predictions), 1)
  n, correct = c.sum(), np.trace(c)
  p, t = c.sum(0), c.sum(1)  # predicted, true counts per class
  denom = np.sqrt((n * n - p @ p) * (n * n - t @ t))
  return float((correct * n - t @ p) / denom) if denom else 0.0


def _pearson(x: np.ndarray, y: np.ndarray) -> float:
  x, y = x - x.mean(), y - y.mean()
  denom = np.sqrt(np.sum(x * x) * np.sum(y * y))
  return float(np.sum(x * y) / denom) if denom else 0.0


def _ranks(x: np.ndarray) -> np.ndarray:
  """Ranks with ties averaged (what Spearman's correlation needs)."""
  order = np.argsort(x, kind="stable")
  ranks = np.empty(len(x))
  ranks[order] = np.arange(len(x))
  values, inverse = np.unique(x, return_inverse=True)
  sums = np.bincount(inverse, ranks)
  return (sums / np.bincount(inverse))[inverse]
