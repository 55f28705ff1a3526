"""Preference tuning (DPO) of a chat model on pairs about the bundled plays.

  python -m launch.finetune --config experiments/chat_tiny.py --init_from runs/clm_tiny \
      --workdir runs/chat_tiny
  python -m launch.finetune --config experiments/dpo_tiny.py --init_from runs/chat_tiny \
      --workdir runs/dpo_tiny [--config.objective.beta=0.1 --config.objective.label_smoothing=0.0]

Each pair (experiments/data/dpo_{train,eval}.jsonl, from make_dialogues.py) shows a
passage and asks who speaks first: `chosen` names the first speaker, `rejected`
another speaker of the passage; the eval plays are held out. The reference model
is the --init_from run, its log-probabilities computed once before training.
results.json holds the held-out DPO loss, the mean rewards of chosen and rejected,
their margin and the reward accuracy.
"""

import os

import ml_collections

from lmjax.experiment import default_config

DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")


def get_config(arg: str = "") -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict(default_config("dpo"))
  c.task.update(train_file=os.path.join(DATA, "dpo_train.jsonl"),
                eval_file=os.path.join(DATA, "dpo_eval.jsonl"))
  c.objective.update(beta=0.1, label_smoothing=0.0, truncation="drop")
  c.data.seq_len = 256
  c.model.dropout_rate = 0.0
  c.optimizer.update(learning_rate=5e-4, warmup_steps=10, schedule="cosine", weight_decay=0.0)
  c.train.update(steps=200, batch_size=16, log_every=10, eval_every=50, eval_batches=0,
                 checkpoint_every=50)
  return c
