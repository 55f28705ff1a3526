"""A LoRA run's ties to its base: the base's identity in every checkpoint, the checks a
resume makes, and the initial parameters (the base, fresh or imported adapters)."""

from __future__ import annotations

from typing import Any

import jax

from lmjax import paths
from lmjax.errors import UserError
from lmjax.lora.adapters import checksum, combine, fit, without_adapters
from lmjax.lora.config import LoraConfig

BASE_KEY = "lora_base"  # checkpoint metadata: {"path", "sha256"} of the frozen base
# Fields that change what the adapters compute: a resume must keep them.
FIXED_FIELDS = ("enabled", "rank", "alpha", "rslora", "targets", "base_dtype", "init_from")
ADAPTER_SEED = 1 << 29  # fold_in of the run's seed that draws fresh adapters

__all__ = ["BASE_KEY", "base_identity", "check_resume", "initial", "without_adapters"]


def base_identity(source: Any) -> dict[str, str]:
  """{"path", "sha256"} of `train.init_from`'s weights (`lmjax.pretrained.Pretrained`)."""
  path = source.source.split(" ")[0]
  return {"path": paths.resolve(path) if not paths.is_remote(path) else path,
          "sha256": checksum(source.params)}


def check_resume(meta: dict[str, Any], lora: LoraConfig, base_id: dict[str, str] | None,
                 where: str, step: int) -> None:
  """Refuses, in one line, a checkpoint whose adapters belong to another base or another
  adapter configuration than this run's."""
  saved = meta.get("config", {}).get("lora", {})
  current = _dict(lora)
  if bool(saved.get("enabled") or saved.get("init_from")) != lora.active:
    raise UserError(f"{where} step {step} was {'' if lora.active else 'not '}trained without "
                    "LoRA adapters but this run's lora section says otherwise; use a new "
                    "--workdir")
  if not lora.active:
    return
  differ = [k for k in FIXED_FIELDS if _norm(saved.get(k)) != _norm(current[k])]
  if differ:
    raise UserError(f"{where} holds adapters with other lora.{', lora.'.join(differ)}; use a "
                    "new --workdir")
  theirs = meta.get(BASE_KEY, {})
  if base_id is not None and theirs.get("sha256") != base_id["sha256"]:
    raise UserError(f"{where} step {step} holds adapters trained on another base "
                    f"({theirs.get('path')}, sha256 {str(theirs.get('sha256'))[:12]}); "
                    f"train.init_from={base_id['path']} has sha256 {base_id['sha256'][:12]}")


def _dict(cfg: LoraConfig) -> dict[str, Any]:
  import dataclasses
  return dataclasses.asdict(cfg)


def _norm(value: Any) -> Any:
  return list(value) if isinstance(value, (list, tuple)) else value


def initial(spec: Any, params: dict[str, Any], seed: int, source: Any, model: Any
            ) -> dict[str, Any]:
  """The base's parameters with the run's fresh adapters (drawn as `init_state` draws
  them) or those of `lora.init_from` (a PEFT directory), the base quantized as asked."""
  rng = jax.random.fold_in(jax.random.PRNGKey(seed), ADAPTER_SEED)
  params = spec.prepare(params, rng)
  if not spec.cfg.init_from:
    return params
  from lmjax.lora import peft
  _, tree = peft.read(spec.cfg.init_from, model, peft.family(source))
  theirs, out = _flat(tree), {}
  for name in spec.targets:
    a, b = _flat(params)[name + "/lora_a"], _flat(params)[name + "/lora_b"]
    if name + "/lora_a" not in theirs or name + "/lora_b" not in theirs:
      raise UserError(f"lora.init_from={spec.cfg.init_from} has no adapter for {name}")
    kernel = (*a.shape[:-1], *b.shape[b.ndim - len(spec.targets[name].features):])
    out[name] = fit(kernel, theirs[name + "/lora_a"], theirs[name + "/lora_b"])
  for name, (a, b) in out.items():
    params = combine(params, _nest(name, {"lora_a": a, "lora_b": b}))
  return params


def _nest(name: str, leaves: dict[str, Any]) -> dict[str, Any]:
  for key in reversed(name.split("/")):
    leaves = {key: leaves}
  return leaves


def _flat(tree: dict[str, Any]) -> dict[str, Any]:
  return {"/".join(str(getattr(k, "key", k)) for k in path): v
          for path, v in jax.tree_util.tree_leaves_with_path(tree)}


def settle(exp: Any, source: Any) -> Any:
  """The experiment with `lora.init_from`'s own rank, alpha, scaling and adapted layers
  (a PEFT adapter directory decides them, as `train.init_from` decides the architecture)."""
  cfg = exp.lora
  if not cfg.init_from or source is None:
    return exp
  import dataclasses
  import re
  from lmjax.lora import peft
  config, tree = peft.read(cfg.init_from, exp.model, peft.family(source))
  layers = sorted({k.rsplit("/", 1)[0] for k in _flat(tree)})
  lora = dataclasses.replace(cfg, rank=int(config["r"]), alpha=float(config["lora_alpha"]),
                             rslora=bool(config.get("use_rslora", False)),
                             targets=tuple(f"^{re.escape(k)}$" for k in layers))
  return dataclasses.replace(exp, lora=lora)


def quantized_layers(spec: Any) -> dict[str, list[list[int]]]:
  """{layer: [input axes, output axes]} of the kernels a QLoRA run keeps quantized
  (kept beside the base's identity, so that a merge sees the base as training did)."""
  if spec.cfg.base_dtype == "float":
    return {}
  return {k: [list(v.in_shape), list(v.features)] for k, v in spec.frozen_dense().items()}


def roundtrip(params: dict[str, Any], base_id: dict[str, Any], kind: str) -> dict[str, Any]:
  """Host parameters with the kernels a QLoRA run quantized replaced by their dequantized
  values: the base the adapters were trained against."""
  layers = base_id.get("quantized", {})
  if kind == "float" or not layers:
    return params
  import numpy as np
  from lmjax.lora import quant
  out = jax.tree.map(lambda x: x, params)
  for name, (in_shape, features) in layers.items():
    node = out
    for key in name.split("/"):
      node = node[key]
    kernel = np.asarray(node["kernel"])
    n_lead = kernel.ndim - len(in_shape) - len(features)
    leaves = quant.quantize(kernel, n_lead, len(in_shape), kind)
    back = lambda leaf: quant.dequantize(leaf, np.float32).reshape(-1)[:kernel[
        (0,) * n_lead].size]
    for _ in range(n_lead):
      back = jax.vmap(back)
    node["kernel"] = np.asarray(back(leaves)).reshape(kernel.shape).astype(kernel.dtype)
  return out
