"""Weights to start from: an lmjax run directory or a Hugging Face model directory.

`load(path)` returns the architecture, the parameters (host arrays in lmjax's
layout) and the tokenizer that belongs to them, whichever the source. The
launchers for generation, fill-mask, evaluation and fine-tuning, and
`train.init_from`, all go through it.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Callable

import jax
import numpy as np

from lmjax import paths
from lmjax.checkpoint import Checkpointer
from lmjax.data.tokenizer import Tokenizer
from lmjax.errors import UserError
from lmjax.model.config import TransformerConfig
from lmjax.model.transformer import stack_layers, unstack_layers


@dataclasses.dataclass
class Pretrained:
  model: TransformerConfig
  params: dict[str, Any]  # nested dicts of arrays, lmjax names and layout
  tokenizer: Any  # lmjax.data.tokenizer.Tokenizer or lmjax.data.hf_tokenizer.HFTokenizer
  objective: str  # "clm" or "mlm": what the weights were trained for
  source: str  # where they came from, for messages


def is_hf_dir(path: str) -> bool:
  return os.path.isfile(os.path.join(path, "config.json"))


def load(path: str, dtype: str | None = None) -> Pretrained:
  """An lmjax run (its newest intact checkpoint; local or in a bucket) or a Hugging Face
  directory (local). It computes in `dtype` if given, else in what it declares: a Hugging
  Face checkpoint's `dtype`/`torch_dtype` (float32 when absent), a run's `model.dtype`."""
  source = _load(path)
  if dtype:
    source.model = source.model.replace(dtype=dtype)
  return source


def _load(path: str) -> Pretrained:
  if paths.is_remote(path):
    paths.check_access(path, write=False)
  if not paths.isdir(path):
    raise UserError(f"{path} is not a directory (expected an lmjax run or a Hugging Face "
                    "model directory)")
  if not paths.is_remote(path) and is_hf_dir(path):
    from lmjax.convert.hf import import_hf
    return import_hf(path)
  if paths.isdir(paths.join(path, "checkpoints")):
    return load_run(path)
  raise UserError(f"{path} holds neither checkpoints/ (an lmjax run) nor config.json "
                  "(a Hugging Face model)")


def load_run(workdir: str) -> Pretrained:
  ckpt = Checkpointer(workdir, read_only=True)
  try:
    steps = sorted(ckpt.all_steps(), reverse=True)
    if not steps:
      raise UserError(f"{workdir} has no checkpoints yet")
    params, meta = ckpt.restore_params(steps[0])
  except UserError:
    raise
  except Exception as e:  # unreadable or damaged: the training run would set it aside
    raise UserError(f"cannot read {workdir}/checkpoints/{steps[0]} ({type(e).__name__}: "
                    f"{str(e).splitlines()[0][:200] if str(e) else ''}); resume the run once "
                    "to set damaged steps aside") from None
  finally:
    ckpt.close()
  tokenizer = load_run_tokenizer(workdir)
  if meta.get("tokenizer_sha256") not in (None, tokenizer.sha256):
    raise UserError(f"{workdir}/tokenizer.model is not the tokenizer the run was trained with")
  model = TransformerConfig(**meta["config"]["model"])
  objective = "clm" if model.family == "decoder" else "mlm"  # what the backbone models
  return Pretrained(model, jax.tree.map(np.asarray, params), tokenizer, objective,
                    f"{workdir} step {steps[0]}")


HF_TOKENIZER_DIR = "tokenizer"  # a run's Hugging Face tokenizer (no config.json at its top)
CHAT_TEMPLATE = "chat_template.jinja"


def save_tokenizer(tokenizer: Any, workdir: str) -> None:
  """Writes a run's tokenizer beside its checkpoints: lmjax's SentencePiece model as
  tokenizer.model, a Hugging Face tokenizer's files (and its special ids) in tokenizer/."""
  from lmjax.data.hf_tokenizer import HFTokenizer
  if not isinstance(tokenizer, HFTokenizer):
    paths.write_atomic(paths.join(workdir, "tokenizer.model"), tokenizer.data)
    return
  origin, folder = os.path.dirname(tokenizer.path), paths.join(workdir, HF_TOKENIZER_DIR)
  paths.makedirs(folder)
  for name in (os.path.basename(tokenizer.path), "tokenizer_config.json", CHAT_TEMPLATE):
    if os.path.isfile(os.path.join(origin, name)):
      with open(os.path.join(origin, name), "rb") as f:
        paths.write_atomic(paths.join(folder, name), f.read())
  ids = {f"{k}_token_id": getattr(tokenizer.special, k) for k in ("bos", "eos", "pad")}
  paths.write_atomic(paths.join(folder, "config.json"), json.dumps(ids))


def load_run_tokenizer(workdir: str) -> Any:
  """The tokenizer `save_tokenizer` (or pretraining) put in a run, with the chat template
  a chat run saved beside it."""
  if paths.isdir(paths.join(workdir, HF_TOKENIZER_DIR)) and not paths.is_remote(workdir):
    from lmjax.data.hf_tokenizer import HFTokenizer
    tokenizer = HFTokenizer(os.path.join(workdir, HF_TOKENIZER_DIR))
  else:
    tokenizer = Tokenizer(paths.join(workdir, "tokenizer.model"))
  template = paths.join(workdir, CHAT_TEMPLATE)
  if paths.exists(template):
    tokenizer.chat_template = paths.read_bytes(template).decode("utf-8")
  return tokenizer


def to_layout(params: dict[str, Any], source: TransformerConfig,
              target: TransformerConfig) -> dict[str, Any]:
  """Converts between scanned and unrolled layer layouts."""
  if source.scan_layers and not target.scan_layers:
    return unstack_layers(params, source.num_layers)
  if target.scan_layers and not source.scan_layers:
    return stack_layers(params, source.num_layers)
  return params


def merge_params(fresh: dict[str, Any], loaded: dict[str, Any], source: str,
                 may_be_new: Callable[[str], bool] = lambda path: False) -> dict[str, Any]:
  """`fresh` (this model's initial parameters) with every array that `loaded` also has.

  A shape mismatch is an error naming the array; arrays only `fresh` has must
  satisfy `may_be_new` (a new task head), else the checkpoint does not fit.
  """
  flat_loaded = {param_name(k): v for k, v in jax.tree_util.tree_leaves_with_path(loaded)}

  def pick(path, x):
    key = param_name(path)
    if key not in flat_loaded:
      if may_be_new(key):
        return x
      raise UserError(f"--init_from {source}: it has no parameter {key}; this model needs "
                      "one (a different architecture?)")
    value = flat_loaded[key]
    if tuple(value.shape) != tuple(x.shape):
      raise UserError(f"--init_from {source}: parameter {key} has shape {tuple(value.shape)} "
                      f"there but {tuple(x.shape)} in this model")
    return np.asarray(value, dtype=x.dtype)

  return jax.tree_util.tree_map_with_path(pick, fresh)


def require_weights(source: Pretrained, model: Any, sample: Any, what: str) -> None:
  """Refuses, in one line, weights that lack arrays `model` needs (a BertModel checkpoint,
  without the MLM head, cannot score masked tokens)."""
  from lmjax.sharding import unbox
  expected = unbox(jax.eval_shape(model.init, jax.random.PRNGKey(0), sample)["params"])
  have = {param_name(k) for k, _ in jax.tree_util.tree_leaves_with_path(source.params)}
  missing = [param_name(k) for k, _ in jax.tree_util.tree_leaves_with_path(expected)
             if param_name(k) not in have]
  if missing:
    head = " (the MLM head: a BertModel checkpoint? use BertForMaskedLM weights)" if \
        source.model.family == "encoder" else " (the LM head?)"
    more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
    raise UserError(f"{source.source} lacks {missing[0]}{more}{head}; {what} needs them")


def param_name(path: tuple) -> str:
  """'transformer/embed/tokens/embedding' for a tree path of dict keys."""
  return "/".join(str(getattr(k, "key", k)) for k in path)
