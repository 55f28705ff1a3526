"""From the data config to train and eval datasets."""

from __future__ import annotations

import dataclasses

from lmjax.data.batches import PackedDataset
from lmjax.data.corpus import open_corpus
from lmjax.data.tokenizer import Tokenizer


@dataclasses.dataclass(frozen=True)
class DataConfig:
  # Token store directories (`python -m launch.prepare_data`), or text files, directories and
  # globs (.txt, .jsonl, .jsonl.gz/.json.gz, .jsonl.zst, .parquet) prepared into cache_dir.
  train_files: tuple[str, ...] = ()
  eval_files: tuple[str, ...] = ()  # held-out documents for evaluation, the same kinds
  tokenizer: str = ""  # SentencePiece model from `python -m launch.train_tokenizer`
  cache_dir: str = "~/.cache/lmjax/tokens"  # stores prepared from text entries, shared by runs
  seq_len: int = 128  # tokens per packed row
  text_field: str = "text"  # the JSON field / parquet column holding each document
  bad_utf8: str = "fail"  # invalid UTF-8 lines: "fail" with the line number, or "skip" and count
  prepare_workers: int = 0  # processes preparing text entries (0: every core)

  def __post_init__(self):
    if self.bad_utf8 not in ("fail", "skip"):
      raise ValueError(f"data.bad_utf8 must be 'fail' or 'skip', got {self.bad_utf8!r}")
    if self.seq_len < 1:
      raise ValueError(f"data.seq_len must be positive, got {self.seq_len}")
    if self.prepare_workers < 0:
      raise ValueError(f"data.prepare_workers must be >= 0, got {self.prepare_workers}")


def delimiters(tokenizer: Tokenizer, objective: str) -> tuple[int, int]:
  """The ids framing each document: [bos] ... [eos] for CLM, [CLS] ... [SEP] for MLM."""
  sp = tokenizer.special
  return (sp.bos, sp.eos) if objective == "clm" else (sp.cls, sp.sep)


def build_datasets(cfg: DataConfig, tokenizer: Tokenizer, objective: str,
                   seed: int) -> tuple[PackedDataset, PackedDataset]:
  """Shuffled training rows and unshuffled evaluation rows."""
  begin, end = delimiters(tokenizer, objective)
  open_ = lambda entries, what: open_corpus(
      entries, tokenizer, begin, end, objective, cfg.cache_dir, what, cfg.text_field,
      cfg.bad_utf8, cfg.prepare_workers)
  train, held_out = open_(cfg.train_files, "train"), open_(cfg.eval_files, "eval")
  return (PackedDataset(train, cfg.seq_len, seed, shuffle=True),
          PackedDataset(held_out, cfg.seq_len, seed, shuffle=False))
