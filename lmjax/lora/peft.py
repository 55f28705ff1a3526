"""Adapters in PEFT's format, both ways: `adapter_config.json` + `adapter_model.safetensors`.

PEFT names an adapter by the module it adapts, e.g.
`base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight`, with lora_A (r, in) and
lora_B (out, r) as torch Linear weights. lmjax's adapter of a kernel (*in, *out) is
a (*in, r) and b (r, *out); a projection's Hugging Face weight is the kernel flattened
to (in, out) and transposed (`lmjax.convert.tables`), so A = a.reshape(-1, r).T and
B = b.reshape(r, -1).T. The Hugging Face names come from the family's conversion table
(the LLaMA-built decoder families); a fused projection (Phi-3's qkv_proj) has no
per-projection adapter in PEFT and is refused.
"""

from __future__ import annotations

import json
import os
import re
from typing import Any

import numpy as np

from lmjax.convert import decoders
from lmjax.convert.hf import PREFIXES, config_to_hf
from lmjax.convert.weights import read_file
from lmjax.errors import UserError
from lmjax.model.transformer import stack_layers, unstack_layers

CONFIG, WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
PREFIX = "base_model.model."
# PEFT options lmjax's adapters cannot honour, with the value that is fine.
UNSUPPORTED = {"use_dora": False, "fan_in_fan_out": False, "bias": "none",
               "modules_to_save": None, "layers_to_transform": None, "rank_pattern": {},
               "alpha_pattern": {}, "lora_bias": False, "use_qalora": False,
               "layer_replication": None, "target_parameters": None}


def module_names(model: Any, kind: str) -> dict[str, str]:
  """{Hugging Face module (full name, no `.weight`): unrolled lmjax layer} of every
  projection of a `kind` model shaped as `model` that PEFT can adapt."""
  if kind not in decoders.ARCHITECTURES:
    raise UserError(f"PEFT adapters are written and read for the LLaMA-built families "
                    f"({', '.join(decoders.ARCHITECTURES)}), not {kind}")
  out = {}
  for entry in decoders.table(model, kind):
    if len(entry.paths) == 1 and entry.paths[0].endswith("/kernel") and \
        entry.hf.endswith(".weight") and not entry.hf.startswith("^"):
      out[PREFIXES[kind] + entry.hf[:-len(".weight")]] = entry.paths[0][:-len("/kernel")]
  return out


def family(source: Any) -> str:
  """The Hugging Face family of a base (`lmjax.pretrained.Pretrained`): its own if it is a
  Hugging Face directory, else the one its architecture exports as."""
  path = source.source.split(" ")[0]
  config = os.path.join(path, "config.json")
  if os.path.isfile(config):
    with open(config) as f:
      return json.load(f).get("model_type", "")
  return config_to_hf(source.model, source.tokenizer.special)[0]


def _node(tree: dict[str, Any], layer: str) -> dict[str, Any] | None:
  for key in layer.split("/"):
    if not isinstance(tree, dict) or key not in tree:
      return None
    tree = tree[key]
  return tree


def export(adapters: dict[str, Any], model: Any, kind: str, cfg: Any, directory: str,
           base: str) -> list[str]:
  """Writes `adapters` (lmjax names, the run's layout) as a PEFT adapter directory for the
  `kind` base at `base`; returns the adapted modules."""
  from safetensors.numpy import save_file
  unrolled = unstack_layers(adapters, model.num_layers) if model.scan_layers else adapters
  tensors, modules = {}, []
  for hf, layer in module_names(model, kind).items():
    node = _node(unrolled, layer)
    if node is None or "lora_a" not in node:
      continue
    a, b = np.asarray(node["lora_a"], np.float32), np.asarray(node["lora_b"], np.float32)
    rank = a.shape[-1]
    tensors[f"{PREFIX}{hf}.lora_A.weight"] = np.ascontiguousarray(a.reshape(-1, rank).T)
    tensors[f"{PREFIX}{hf}.lora_B.weight"] = np.ascontiguousarray(b.reshape(rank, -1).T)
    modules.append(hf)
  if not modules:
    raise UserError(f"no adapter of this run is on a projection a {kind} model has in PEFT")
  os.makedirs(directory, exist_ok=True)
  save_file(tensors, os.path.join(directory, WEIGHTS), metadata={"format": "pt"})
  config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base,
            "r": cfg.rank, "lora_alpha": cfg.alpha, "lora_dropout": cfg.dropout,
            "use_rslora": cfg.rslora, "target_modules": sorted(modules),
            "init_lora_weights": True, "inference_mode": True, **UNSUPPORTED}
  with open(os.path.join(directory, CONFIG), "w") as f:
    json.dump(config, f, indent=2)
  return modules


def read_config(directory: str) -> dict[str, Any]:
  """A PEFT adapter directory's config, refused in one line where lmjax cannot honour it."""
  path = os.path.join(directory, CONFIG)
  if not os.path.isfile(path):
    raise UserError(f"{directory} is not a PEFT adapter directory (no {CONFIG})")
  try:
    with open(path) as f:
      config = json.load(f)
  except (OSError, ValueError) as e:
    raise UserError(f"{path}: {type(e).__name__}: {e}") from None
  if config.get("peft_type") != "LORA":
    raise UserError(f"{directory} holds a {config.get('peft_type')} adapter; lmjax reads LoRA "
                    "adapters only")
  for key, fine in UNSUPPORTED.items():
    if config.get(key) not in (fine, None, {}, [], False):
      raise UserError(f"{path}: {key}={config[key]!r} is not supported (lmjax's adapters are "
                      f"plain LoRA: {key}={fine!r})")
  if not os.path.isfile(os.path.join(directory, WEIGHTS)):
    raise UserError(f"{directory} has no {WEIGHTS}")
  return config


def read(directory: str, model: Any, kind: str) -> tuple[dict[str, Any], dict[str, Any]]:
  """(config, adapters as lmjax parameters in `model`'s layout) of a PEFT directory for a
  `kind` base shaped as `model`; adapters of modules that base lacks are refused. Each
  adapter is flat, (in, r) and (r, out) after any layer axis: `adapters.fit` shapes it
  as its kernel's."""
  config = read_config(directory)
  names = module_names(model, kind)
  tensors = read_file(os.path.join(directory, WEIGHTS))
  tree: dict[str, Any] = {}
  for key, value in tensors.items():
    match = re.fullmatch(rf"{re.escape(PREFIX)}(.+)\.lora_([AB])(?:\.\w+)?\.weight", key)
    if match is None or match.group(1) not in names:
      raise UserError(f"{directory}: {key} adapts no projection of this {kind} model "
                      "(an adapter for another family or architecture?)")
    node = tree
    for part in names[match.group(1)].split("/"):
      node = node.setdefault(part, {})
    node["lora_a" if match.group(2) == "A" else "lora_b"] = np.asarray(value, np.float32).T
  if model.scan_layers:
    try:
      tree = stack_layers(tree, model.num_layers)
    except (KeyError, ValueError) as e:
      raise UserError(f"{directory} adapts a projection in some layers only ({e}); lmjax "
                      "adapts a projection in every layer or none") from None
  return config, tree
