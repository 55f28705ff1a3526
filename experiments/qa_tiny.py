"""Reading comprehension (SQuAD 2.0 format) on a pretrained encoder, in windows.

  python -m launch.train --config experiments/mlm_tiny.py --workdir runs/mlm_tiny
  python -m launch.finetune --config experiments/qa_tiny.py --init_from runs/mlm_tiny \
      --workdir runs/qa_tiny

experiments/data/qa_{train,eval}.json (from experiments/data/make_qa.py) ask where a
passage says a word; a quarter name a word it does not hold (unanswerable). Passages
are often longer than `data.seq_len`, so each is read in windows overlapping by
`objective.doc_stride` tokens, and the answer is the best span over them (run_qa's rules).
results.json holds exact match and F1 by the official SQuAD 2.0 rules, with the
HasAns/NoAns split and the best null threshold; predictions.json the answers, in the
format the official script reads. A Hugging Face BERT directory works as --init_from;
so does a decoder (question first, then the context).
"""

import os

import ml_collections

from lmjax.experiment import default_config

DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")


def get_config(arg: str = "") -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict(default_config("qa"))
  c.task.update(train_file=os.path.join(DATA, "qa_train.json"),
                eval_file=os.path.join(DATA, "qa_eval.json"))
  c.objective.update(doc_stride=16, max_answer_tokens=8)
  c.data.seq_len = 64
  c.model.dropout_rate = 0.0
  c.optimizer.update(learning_rate=2e-3, warmup_steps=30, schedule="linear", end_lr_ratio=0.0,
                     weight_decay=0.01)
  c.train.update(steps=600, batch_size=32, log_every=20, eval_every=200, eval_batches=0,
                 checkpoint_every=200)
  return c
