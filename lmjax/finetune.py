"""lmjax 0.1's fine-tuning schema, for experiment files written against it.

Fine-tuning is an objective of the one experiment schema now (`objective.kind=sft`,
`dpo`, `classification`, `regression`, `qa`, with `train.init_from`): new experiment
files start from `lmjax.experiment.default_config("sft")`. A file that still builds on
`default_finetune_config()` gets that release's layout (`task.kind`, `task.seq_len`, a
`dpo` section), which `lmjax.experiment.upgrade_legacy` reads into today's schema.
"""

from __future__ import annotations

from typing import Any


def default_finetune_config() -> dict[str, Any]:
  """lmjax 0.1's fine-tuning sections at their defaults (read by `upgrade_legacy`)."""
  from lmjax.experiment import default_config
  new = default_config("classification")
  task = {"kind": "classification", **new["task"], "seq_len": 128, "dropout_rate": 0.1,
          "chat_template": "", "truncation": "drop", "pack": True, "doc_stride": 0,
          "max_answer_tokens": 30, "n_best": 20, "null_threshold": 0.0}
  train = {**new["train"], "steps": 300, "log_every": 20, "eval_batches": 0,
           "checkpoint_every": 100}
  return {"task": task, "optimizer": new["optimizer"], "train": train, "mesh": new["mesh"],
          "runtime": new["runtime"], "dpo": {"beta": 0.1, "label_smoothing": 0.0}}
