"""Weights to start from: an lmjax run directory or a Hugging Face model directory.

`load(path)` returns the architecture, the parameters (host arrays in lmjax's
layout) and the tokenizer that belongs to them (`lmjax.data.tokenizer_io`),
whichever the source. The launchers for generation, fill-mask, evaluation,
serving, conversion and fine-tuning, and `train.init_from`, all go through it.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable

import jax
import numpy as np
from absl import logging

from lmjax import paths
from lmjax.checkpoint import Checkpointer
from lmjax.convert.hf import read_hf
from lmjax import lora
from lmjax.data.tokenizer_io import HF_TOKENIZER_DIR, load_tokenizer
from lmjax.errors import UserError
from lmjax.inference import generation_config
from lmjax.lora import runs as lora_runs
from lmjax.model.config import TransformerConfig
from lmjax.model.transformer import stack_layers, unstack_layers


@dataclasses.dataclass
class Pretrained:
  model: TransformerConfig
  params: dict[str, Any]  # nested dicts of arrays, lmjax names and layout
  tokenizer: Any  # what lmjax.data.tokenizer_io.load_tokenizer returns
  objective: str  # "clm" or "mlm": what the weights were trained for
  source: str  # where they came from, for messages
  # generation_config.json's contents ({} if none): a Hugging Face directory's, or the one a
  # run fine-tuned from such a directory keeps beside its tokenizer
  generation: dict[str, Any] = dataclasses.field(default_factory=dict)


def is_hf_dir(path: str) -> bool:
  """A (local) Hugging Face model directory, rather than an lmjax run."""
  return not paths.is_remote(path) and os.path.isfile(os.path.join(path, "config.json"))


def load(path: str, dtype: str | None = None, announce: bool = False, adapter: str = ""
         ) -> Pretrained:
  """An lmjax run (its newest intact checkpoint; local or in a bucket) or a Hugging Face
  directory (local). It computes in `dtype` if given, else in what it declares: a Hugging
  Face checkpoint's `dtype`/`torch_dtype` (float32 when absent), a run's `model.dtype`.
  `announce` logs which dtype that is and why (the launchers' first line about a model).
  `adapter`: a PEFT LoRA adapter directory, merged into the weights."""
  source = _load(path)
  if adapter:
    source = with_adapter(source, adapter)
  if dtype:
    source.model = source.model.replace(dtype=dtype)
  if announce:
    declared = "--dtype" if dtype else f"model.dtype={source.model.dtype}"
    # `auto` depends on the backend, which then starts; an explicit dtype needs none yet (a
    # bad checkpoint found next stays a one-line error, without the backend's start-up noise)
    name = source.model.resolved_dtype if source.model.dtype == "auto" else source.model.dtype
    logging.info("%s computes in %s (%s)", source.source, name, declared)
  return source


def _load(path: str) -> Pretrained:
  if paths.is_remote(path):
    paths.check_access(path, write=False)
  if not paths.isdir(path):
    raise UserError(f"{path} is not a directory (expected an lmjax run or a Hugging Face "
                    "model directory)")
  if is_hf_dir(path):
    return load_hf(path)
  if paths.isdir(paths.join(path, "checkpoints")):
    return load_run(path)
  raise UserError(f"{path} holds neither checkpoints/ (an lmjax run) nor config.json "
                  "(a Hugging Face model)")


def load_hf(directory: str) -> Pretrained:
  """A Hugging Face directory (float32 weights, scanned layout) with its tokenizer."""
  weights = read_hf(directory)
  objective = "mlm" if weights.kind == "bert" else "clm"
  return Pretrained(weights.config, weights.params, load_tokenizer(directory), objective,
                    f"{directory} (Hugging Face {weights.kind})",
                    generation_config.read_file(directory))


def load_run(workdir: str) -> Pretrained:
  params, meta, step = read_run(workdir)
  tokenizer = load_tokenizer(workdir)
  if meta.get("tokenizer_sha256") not in (None, tokenizer.sha256):
    raise UserError(f"{tokenizer.path} is not the tokenizer the run was trained with")
  model = TransformerConfig(**meta["config"]["model"])
  objective = "clm" if model.family == "decoder" else "mlm"  # what the backbone models
  if lora_runs.BASE_KEY in meta:  # adapters only: merged into the base they were trained on
    params = _with_base(params, meta, model, workdir)
  saved = paths.join(workdir, HF_TOKENIZER_DIR)
  generation = {} if paths.is_remote(workdir) else generation_config.read_file(saved)
  return Pretrained(model, params, tokenizer, objective, f"{workdir} step {step}", generation)


def read_run(workdir: str) -> tuple[dict[str, Any], dict[str, Any], int]:
  """(params as host arrays, meta, step) of a run's newest checkpoint: a LoRA run's
  params are its adapters (and a new head)."""
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
  return jax.tree.map(np.asarray, params), meta, steps[0]


def lora_base(meta: dict[str, Any], workdir: str) -> Pretrained:
  """The base a LoRA run's adapters were trained on, refused if its weights changed."""
  base_id = meta[lora_runs.BASE_KEY]
  base = load(base_id["path"])
  if lora_runs.base_identity(base)["sha256"] != base_id["sha256"]:
    raise UserError(f"{workdir} holds adapters for the base {base_id['path']}, whose weights "
                    "have changed since (sha256 differs)")
  return base


def lora_config(meta: dict[str, Any]) -> lora.LoraConfig:
  return lora.LoraConfig(**{k: tuple(v) if isinstance(v, list) else v
                            for k, v in meta["config"]["lora"].items()})


def _with_base(adapters: dict[str, Any], meta: dict[str, Any], model: TransformerConfig,
               workdir: str) -> dict[str, Any]:
  """A LoRA run's weights: its base (`train.init_from`, checked against the checksum
  the run kept) with the adapters merged into the kernels."""
  base, cfg = lora_base(meta, workdir), lora_config(meta)
  full = lora.combine(to_layout(base.params, base.model, model), adapters)
  return lora.merged(lora_runs.roundtrip(full, meta[lora_runs.BASE_KEY], cfg.base_dtype),
                     cfg.scale)


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


def with_adapter(source: Pretrained, directory: str) -> Pretrained:
  """`source` with a PEFT LoRA adapter directory merged into its weights (what
  `--adapter` of the generation, serving and evaluation launchers loads)."""
  from lmjax.lora import peft
  config, tree = peft.read(directory, source.model, peft.family(source))
  rank, alpha = int(config["r"]), float(config["lora_alpha"])
  scale = alpha / (rank ** 0.5 if config.get("use_rslora") else rank)
  flat = {param_name(k): v for k, v in jax.tree_util.tree_leaves_with_path(source.params)}
  leaves = {param_name(k): v for k, v in jax.tree_util.tree_leaves_with_path(tree)}
  for name in sorted({k.rsplit("/", 1)[0] for k in leaves}):
    if name + "/kernel" not in flat:
      raise UserError(f"--adapter {directory}: {name} is not a layer of {source.source}")
    a, b = lora.fit(flat[name + "/kernel"].shape, leaves[name + "/lora_a"],
                    leaves[name + "/lora_b"])
    node = tree
    for key in name.split("/"):
      node = node[key]
    node["lora_a"], node["lora_b"] = a, b
  merged = lora.merged(lora.combine(source.params, tree), scale)
  return dataclasses.replace(source, params=merged,
                             source=f"{source.source} + adapter {directory}")
