"""From the data config to train and eval datasets."""

from __future__ import annotations

import dataclasses

from lmjax.data.batches import PackedDataset
from lmjax.data.corpus import check_files, load_token_stream
from lmjax.data.tokenizer import Tokenizer


@dataclasses.dataclass(frozen=True)
class DataConfig:
  train_files: tuple[str, ...] = ()  # .txt (blank-line separated documents) or .jsonl
  eval_files: tuple[str, ...] = ()  # held-out documents for evaluation
  tokenizer: str = ""  # SentencePiece model from `python -m launch.train_tokenizer`
  cache_dir: str = "~/.cache/lmjax/tokens"  # token caches shared by runs
  seq_len: int = 128  # tokens per packed row
  bad_utf8: str = "fail"  # invalid UTF-8 lines: "fail" with the line number, or "skip" and count

  def __post_init__(self):
    if self.bad_utf8 not in ("fail", "skip"):
      raise ValueError(f"data.bad_utf8 must be 'fail' or 'skip', got {self.bad_utf8!r}")


def build_datasets(cfg: DataConfig, tokenizer: Tokenizer, objective: str,
                   seed: int) -> tuple[PackedDataset, PackedDataset]:
  """Shuffled training rows and unshuffled evaluation rows.

  Documents are framed [bos] ... [eos] for CLM and [CLS] ... [SEP] for MLM.
  """
  check_files(cfg.train_files, "train")
  check_files(cfg.eval_files, "eval")
  sp = tokenizer.special
  begin, end = (sp.bos, sp.eos) if objective == "clm" else (sp.cls, sp.sep)
  train = load_token_stream(cfg.train_files, tokenizer, cfg.cache_dir, begin, end, cfg.bad_utf8)
  held_out = load_token_stream(cfg.eval_files, tokenizer, cfg.cache_dir, begin, end,
                               cfg.bad_utf8)
  return (PackedDataset(train, cfg.seq_len, seed, shuffle=True),
          PackedDataset(held_out, cfg.seq_len, seed, shuffle=False))
