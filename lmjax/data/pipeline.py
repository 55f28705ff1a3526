"""From the data config to train and eval datasets."""

from __future__ import annotations

import dataclasses

from typing import Any

from lmjax.data import mixture as mixture_lib
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
  # Weighted sources instead of train_files (lmjax/data/mixture.py): {name: {"train_files":
  # (...), "weight": w, "eval_files": (...) (optional: its own eval loss), "stages":
  # ((step, w), ...) (optional: from that step, weight w)}}
  mixture: dict = dataclasses.field(default_factory=dict)
  mixture_exhausted: str = "wrap"  # a source read past its end: "wrap" (counted) or "stop"

  def __post_init__(self):
    if self.mixture_exhausted not in ("wrap", "stop"):
      raise ValueError(f"data.mixture_exhausted must be 'wrap' or 'stop', got "
                       f"{self.mixture_exhausted!r}")
    if self.mixture and self.train_files:
      raise ValueError("data.mixture and data.train_files both set: list every train entry "
                       "under a source of the mixture")
    # canonical (tuples, floats), so the saved config reads back the same
    object.__setattr__(self, "mixture", mixture_lib.as_config(
        mixture_lib.parse_mixture(self.mixture)))
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
                   seed: int) -> tuple[Any, PackedDataset]:
  """Shuffled training rows (a `MixtureDataset` when `data.mixture` is set) and
  unshuffled evaluation rows."""
  begin, end = delimiters(tokenizer, objective)
  open_ = lambda entries, what: open_corpus(
      entries, tokenizer, begin, end, objective, cfg.cache_dir, what, cfg.text_field,
      cfg.bad_utf8, cfg.prepare_workers)
  if cfg.mixture:
    return _mixture(cfg, open_, seed)
  train, held_out = open_(cfg.train_files, "train"), open_(cfg.eval_files, "eval")
  return (PackedDataset(train, cfg.seq_len, seed, shuffle=True),
          PackedDataset(held_out, cfg.seq_len, seed, shuffle=False))


def _mixture(cfg: DataConfig, open_: Any, seed: int) -> tuple[mixture_lib.MixtureDataset, Any]:
  """The mixture's sources; held out: data.eval_files if given, else every source's own
  eval windows in turn (`InterleavedEval`)."""
  sources = mixture_lib.parse_mixture(cfg.mixture)
  train = [PackedDataset(open_(s.train_files, f"mixture.{s.name}.train"), cfg.seq_len, seed,
                         salt=(mixture_lib.SALT, j)) for j, s in enumerate(sources)]
  evals = {s.name: open_(s.eval_files, f"mixture.{s.name}.eval") for s in sources
           if s.eval_files}
  evals = {k: PackedDataset(v, cfg.seq_len, seed, shuffle=False) for k, v in evals.items()}
  if cfg.eval_files:
    held_out = PackedDataset(open_(cfg.eval_files, "eval"), cfg.seq_len, seed, shuffle=False)
  elif evals:
    held_out = mixture_lib.InterleavedEval(list(evals.values()))
  else:
    open_((), "eval")  # the usual "no eval files given" line
  data = mixture_lib.MixtureDataset([s.name for s in sources], train,
                                    mixture_lib.stage_weights(sources), seed,
                                    cfg.mixture_exhausted, evals)
  return data, held_out
