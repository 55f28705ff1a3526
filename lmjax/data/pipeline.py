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


def build_datasets(cfg: DataConfig, tokenizer: Tokenizer, objective: str,
                   seed: int) -> tuple[PackedDataset, PackedDataset]:
  """Shuffled training rows and unshuffled evaluation rows.

  Documents are framed [bos] ... [eos] for CLM and [CLS] ... [SEP] for MLM.
  """
  check_files(cfg.train_files, "train")
  check_files(cfg.eval_files, "eval")
  sp = tokenizer.special
  begin, end = (sp.bos, sp.eos) if objective == "clm" else (sp.cls, sp.sep)
  train = load_token_stream(cfg.train_files, tokenizer, cfg.cache_dir, begin, end)
  held_out = load_token_stream(cfg.eval_files, tokenizer, cfg.cache_dir, begin, end)
  return (PackedDataset(train, cfg.seq_len, seed, shuffle=True),
          PackedDataset(held_out, cfg.seq_len, seed, shuffle=False))
