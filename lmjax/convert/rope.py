"""RoPE settings of a config.json, in both spellings: transformers 5's `rope_parameters`
(`rope_type`, `rope_theta` and the scaling's own keys; Gemma 3 nests one dict per layer
type) and older checkpoints' `rope_scaling` (with `type` or `rope_type`) beside a top-level
`rope_theta` (and Gemma 3's `rope_local_base_freq`). Read as transformers'
`RotaryEmbeddingConfigMixin` standardises them; written in the 5.x spelling."""

from __future__ import annotations

from typing import Any

from lmjax.errors import UserError
from lmjax.model.config import TransformerConfig

SCALINGS = {"default": "none", "linear": "linear", "llama3": "llama3", "yarn": "yarn"}


def _parameters(hf: dict[str, Any], kind: str) -> tuple[dict[str, Any], dict[str, Any] | None]:
  """(global layers' parameters, local layers' or None), each with its rope_theta."""
  params = dict(hf.get("rope_scaling") or hf.get("rope_parameters") or {})
  if "partial_rotary_factor" in hf:  # moved into the parameters, as transformers does
    params.setdefault("partial_rotary_factor", hf["partial_rotary_factor"])
  if kind != "gemma3_text":
    params.setdefault("rope_theta", hf.get("rope_theta", 10000.0))
    return params, None
  if "full_attention" in params or "sliding_attention" in params:
    full = dict(params.get("full_attention") or {})
    local = dict(params.get("sliding_attention") or {})
  else:  # before transformers 5: scaling for the global layers, a base for the local ones
    full, local = params, {"rope_type": "default"}
  full.setdefault("rope_theta", hf.get("rope_theta", 1_000_000.0))
  local.setdefault("rope_theta", hf.get("rope_local_base_freq", 10_000.0))
  return full, local


def _kind_of(params: dict[str, Any], family: str) -> str:
  name = params.get("rope_type", params.get("type", "default"))
  if family == "phi3" and name in ("su", "yarn"):
    name = "longrope"  # what transformers' Phi-3 makes of them
  if name not in SCALINGS or (family == "phi3" and name != "default"):
    raise UserError(f"{family}: rope_type {name!r} is not supported (lmjax implements "
                    f"{', '.join(SCALINGS) if family != 'phi3' else 'default for phi3'})")
  factor = params.get("partial_rotary_factor", 1.0)
  if factor != 1.0:
    raise UserError(f"{family}: partial_rotary_factor {factor} is not supported (RoPE on the "
                    "whole head only)")
  return name


# The keys each scaling cannot do without (transformers' `_validate_*_rope_parameters`).
REQUIRED = {"linear": ("factor",), "llama3": ("factor", "low_freq_factor", "high_freq_factor"),
            "yarn": ("factor",)}


def _check_numbers(params: dict[str, Any], name: str, family: str) -> None:
  """One line for a required key left out, or any scaling key that is not a number."""
  for key in REQUIRED.get(name, ()):
    if params.get(key) is None:
      raise UserError(f"{family}: rope_type {name!r} needs {key} in its RoPE parameters")
  for key, value in params.items():
    if key not in ("rope_type", "type", "truncate") and value is not None and (
        isinstance(value, bool) or not isinstance(value, (int, float))):
      raise UserError(f"{family}: RoPE parameter {key}={value!r} is not a number")


def _scaling(params: dict[str, Any], hf: dict[str, Any], family: str) -> dict[str, Any]:
  """The lmjax fields of one flat parameter dict."""
  name = _kind_of(params, family)
  _check_numbers(params, name, family)
  out: dict[str, Any] = dict(rope_theta=float(params["rope_theta"]), rope_scaling=SCALINGS[name])
  if name == "default":
    return out
  # transformers prefers a top-level original_max_position_embeddings (Phi-3 keeps it there)
  original = (hf.get("original_max_position_embeddings") or
              params.get("original_max_position_embeddings") or hf["max_position_embeddings"])
  factor = params.get("factor") or hf["max_position_embeddings"] / original
  out["rope_factor"] = float(factor)
  if name == "llama3":
    out.update(rope_original_max_len=int(original),
               rope_low_freq_factor=float(params["low_freq_factor"]),
               rope_high_freq_factor=float(params["high_freq_factor"]))
  elif name == "yarn":
    if params.get("mscale_all_dim"):
      raise UserError(f"{family}: yarn's mscale_all_dim (DeepSeek's attention scaling) is "
                      "not supported")
    out.update(rope_original_max_len=int(original),
               rope_beta_fast=float(params.get("beta_fast") or 32),
               rope_beta_slow=float(params.get("beta_slow") or 1),
               rope_attention_factor=float(params.get("attention_factor") or 0),
               rope_truncate=bool(params.get("truncate", True)))
  return out


def rope_from_hf(hf: dict[str, Any], family: str) -> dict[str, Any]:
  """TransformerConfig's rope_* fields from a config.json; one line for what lmjax lacks
  (longrope, dynamic, partial rotary dimensions, a scaled local RoPE)."""
  full, local = _parameters(hf, family)
  out = _scaling(full, hf, family)
  if local is not None:
    if _kind_of(local, family) != "default":
      raise UserError(f"{family}: scaled RoPE on sliding-window layers is not supported")
    out["rope_local_theta"] = float(local["rope_theta"])
  return out


def _parameters_of(cfg: TransformerConfig, local: bool = False) -> dict[str, Any]:
  if local and cfg.rope_local_theta:
    return {"rope_type": "default", "rope_theta": cfg.rope_local_theta}
  name = {v: k for k, v in SCALINGS.items()}[cfg.rope_scaling]
  out: dict[str, Any] = {"rope_type": name, "rope_theta": cfg.rope_theta}
  if name != "default":
    out["factor"] = cfg.rope_factor
  if name in ("llama3", "yarn"):
    out["original_max_position_embeddings"] = cfg.rope_original_max_len
  if name == "llama3":
    out.update(low_freq_factor=cfg.rope_low_freq_factor, high_freq_factor=cfg.rope_high_freq_factor)
  elif name == "yarn":
    out.update(beta_fast=cfg.rope_beta_fast, beta_slow=cfg.rope_beta_slow,
               truncate=cfg.rope_truncate)
    if cfg.rope_attention_factor:
      out["attention_factor"] = cfg.rope_attention_factor
  return out


def rope_to_hf(cfg: TransformerConfig, family: str) -> dict[str, Any]:
  """config.json's rope settings for `cfg` (Gemma 3: one dict per layer type)."""
  if family == "gemma3_text":
    return dict(rope_parameters={"full_attention": _parameters_of(cfg),
                                 "sliding_attention": _parameters_of(cfg, local=True)})
  return dict(rope_theta=cfg.rope_theta, rope_parameters=_parameters_of(cfg))
