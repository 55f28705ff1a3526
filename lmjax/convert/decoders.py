"""LLaMA and today's families built on it, in Hugging Face's layout: Llama (Llama 3's
RoPE scaling included), Mistral, Qwen2, Qwen3, Gemma 2, Gemma 3 (text), Phi-3, OLMo 2.

They share LLaMA's weight names under `model.` and differ by options, each one a
`TransformerConfig` field: q/k/v biases (Qwen2), query/key norms per head (Qwen3,
Gemma 3) or over the projection (OLMo 2), sliding windows on every layer (Mistral,
Phi-3) or on a pattern of them (Gemma, Qwen), Gemma's sandwich norms, (1 + w) norms,
scaled embeddings, soft-capping and query_pre_attn_scalar, OLMo 2's post-norms, Phi-3's
fused qkv and gate/up weights. A checkpoint using an option lmjax does not implement is
refused in one line that names it. `rope.py` reads and writes the RoPE settings.
"""

from __future__ import annotations

from typing import Any

from absl import logging

from lmjax.convert import moe_families
from lmjax.convert.rope import rope_from_hf, rope_to_hf
from lmjax.convert.tables import (Entry, fused_rows, heads_in, heads_out, linear, norm,
                                  same)
from lmjax.errors import UserError
from lmjax.model.config import TransformerConfig

ARCHITECTURES = {
    "llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM", "gemma2": "Gemma2ForCausalLM",
    "gemma3_text": "Gemma3ForCausalLM", "phi3": "Phi3ForCausalLM", "olmo2": "Olmo2ForCausalLM",
    **moe_families.ARCHITECTURES}  # mixtral, qwen3_moe, olmoe: routed MLPs
GEMMA = ("gemma2", "gemma3_text")
# Each block's norms by where they sit: (Hugging Face name, lmjax module).
NORMS = {
    "pre": (("input_layernorm", "attention_norm"), ("post_attention_layernorm", "mlp_norm")),
    "sandwich": (("input_layernorm", "attention_norm"),
                 ("post_attention_layernorm", "attention_post_norm"),
                 ("pre_feedforward_layernorm", "mlp_norm"),
                 ("post_feedforward_layernorm", "mlp_post_norm")),
    "branch_post": (("post_attention_layernorm", "attention_post_norm"),
                    ("post_feedforward_layernorm", "mlp_post_norm"))}
# What each family's architecture fixes (everything else is read from config.json).
FIXED = {
    "llama": dict(norm_position="pre"),
    "mistral": dict(norm_position="pre"),
    "phi3": dict(norm_position="pre"),
    "qwen2": dict(norm_position="pre", qkv_bias=True),
    "qwen3": dict(norm_position="pre", qk_norm="head"),
    "gemma2": dict(norm_position="sandwich", norm_plus_one=True, embed_scale=True),
    "gemma3_text": dict(norm_position="sandwich", norm_plus_one=True, embed_scale=True,
                        qk_norm="head"),
    "olmo2": dict(norm_position="branch_post", qk_norm="projection"),
    "mixtral": dict(norm_position="pre"),
    "qwen3_moe": dict(norm_position="pre", qk_norm="head"),
    "olmoe": dict(norm_position="pre", qk_norm="projection")}
# Fields a family cannot express unless they are at these values (beyond FIXED).
PLAIN = dict(norm_position="pre", norm_plus_one=False, embed_scale=False, qkv_bias=False,
             qk_norm="none", attn_scale_dim=0.0, attn_softcap=0.0, final_softcap=0.0,
             rope_local_theta=0.0)
HAS_HEAD_DIM = ("llama", "mistral", "qwen3", "gemma2", "gemma3_text", "mixtral",
                "qwen3_moe")  # a config field
# transformers' defaults for keys a config.json may leave out (its class's field defaults).
ACTIVATION = {kind: ("hidden_activation", "gelu_pytorch_tanh") if kind in GEMMA
              else ("hidden_act", "silu") for kind in ARCHITECTURES}
DEFAULTS = {"sliding_window": 4096, "query_pre_attn_scalar": 256, "rms_norm_eps": 1e-6,
            "final_logit_softcapping": None, "attn_logit_softcapping": None}
FAMILY_DEFAULTS = {
    "phi3": {"sliding_window": None, "rms_norm_eps": 1e-5},
    "olmo2": {"rms_norm_eps": 1e-5},
    "mixtral": {"sliding_window": None, "rms_norm_eps": 1e-5},
    "olmoe": {"rms_norm_eps": 1e-5},
    "gemma2": {"final_logit_softcapping": 30.0, "attn_logit_softcapping": 50.0}}


def _read(hf: dict[str, Any], kind: str, key: str) -> Any:
  """config.json's value, or the family's default when the key is absent (null stays)."""
  return hf[key] if key in hf else FAMILY_DEFAULTS.get(kind, {}).get(key, DEFAULTS[key])
TIED_BY_DEFAULT = GEMMA


def table(cfg: TransformerConfig, kind: str) -> list[Entry]:
  """The weights of a `kind` model shaped as `cfg`, unrolled layer by layer."""
  out = [same("embed_tokens.weight", "transformer/embed/tokens/embedding"),
         *norm("norm", "transformer/final_norm", bias=False)]
  if not cfg.tie_embeddings:
    out.append(linear("^lm_head.weight", "lm_head/kernel"))
  for i in range(cfg.num_layers):
    a, p = f"layers.{i}.", f"transformer/stack/layers_{i}/"
    out += _attention(cfg, kind, f"{a}self_attn.", f"{p}attention/")
    if cfg.sparse_layers[i]:  # a router and its experts (Mixtral, Qwen3-MoE, OLMoE)
      out += moe_families.experts_table(cfg, kind, a, p)
    elif kind == "phi3":  # gate and up stacked in one matrix, gate first
      out.append(fused_rows(f"{a}mlp.gate_up_proj.weight", (f"{p}mlp/gate/kernel",
                            f"{p}mlp/up/kernel"), (cfg.d_ff, cfg.d_ff), (None, None)))
    else:
      out += [linear(f"{a}mlp.gate_proj.weight", f"{p}mlp/gate/kernel"),
              linear(f"{a}mlp.up_proj.weight", f"{p}mlp/up/kernel")]
    if not cfg.sparse_layers[i]:
      out.append(linear(f"{a}mlp.down_proj.weight", f"{p}mlp/wo/kernel"))
    for hf, ours in NORMS[cfg.norm_position]:
      out += norm(a + hf, p + ours, bias=False)
  return out


def _attention(cfg: TransformerConfig, kind: str, a: str, p: str) -> list[Entry]:
  h, k, dh = cfg.num_heads, cfg.kv_heads, cfg.dim_per_head
  names = (("q", "query", h), ("k", "key", k), ("v", "value", k))
  if kind == "phi3":  # q, k and v stacked in one matrix, in that order
    out = [fused_rows(f"{a}qkv_proj.weight", [f"{p}{n}/kernel" for _, n, _ in names],
                      (h * dh, k * dh, k * dh), (h, k, k))]
  else:
    out = [heads_in(f"{a}{x}_proj.weight", f"{p}{n}/kernel", n_heads) for x, n, n_heads in names]
  if cfg.qkv_bias:
    out += [heads_in(f"{a}{x}_proj.bias", f"{p}{n}/bias", n_heads) for x, n, n_heads in names]
  out.append(heads_out(f"{a}o_proj.weight", f"{p}out/kernel", h))
  if cfg.qk_norm != "none":
    out += [same(f"{a}q_norm.weight", f"{p}query_norm/norm/scale"),
            same(f"{a}k_norm.weight", f"{p}key_norm/norm/scale")]
  return out


# ----------------------------------------------------------------------------- import


def _refuse(hf: dict[str, Any], kind: str) -> None:
  """One line for the first option of config.json that lmjax does not implement."""
  flags = {"attention_bias": "q, k, v and output biases", "mlp_bias": "MLP biases",
           "use_bidirectional_attention": "bidirectional attention"}
  for key, what in flags.items():
    if hf.get(key):
      raise UserError(f"{kind}: {key}: true ({what}) is not supported")
  if hf.get("pretraining_tp", 1) != 1:
    raise UserError(f"{kind}: pretraining_tp: {hf['pretraining_tp']} is not supported")


def _layer_types(hf: dict[str, Any], kind: str) -> tuple[str, ...]:
  """config.json's per-layer attention kinds, or the family's default pattern."""
  n = hf["num_hidden_layers"]
  if kind in ("mistral", "phi3", "mixtral", "qwen3_moe"):  # the window, when set, is on every layer
    return ("sliding_attention",) * n
  if hf.get("layer_types"):
    return tuple(hf["layer_types"])
  if kind in GEMMA:
    period = 2 if kind == "gemma2" else hf.get("sliding_window_pattern", 6)
    return tuple("sliding_attention" if (i + 1) % period else "full_attention" for i in range(n))
  first = hf.get("max_window_layers", n)  # Qwen: the layers from max_window_layers on
  return tuple("sliding_attention" if i >= first else "full_attention" for i in range(n))


def _window(hf: dict[str, Any], kind: str) -> dict[str, Any]:
  """sliding_window and the shortest repeating layer_types pattern."""
  window = _read(hf, kind, "sliding_window")
  qwen_off = kind in ("qwen2", "qwen3", "qwen3_moe") and not hf.get("use_sliding_window")
  if kind in ("llama", "olmo2", "olmoe") or qwen_off:
    window = None
  types = _layer_types(hf, kind)
  unknown = sorted(set(types) - {"sliding_attention", "full_attention"})
  if unknown:
    raise UserError(f"{kind}: layer_types {unknown[0]!r} is not supported")
  local = tuple(t == "sliding_attention" for t in types)
  if not window or not any(local):
    return {}
  if all(local):
    return dict(sliding_window=window)
  period = next(p for p in range(1, len(local) + 1)
                if all(local[i] == local[i % p] for i in range(len(local))))
  return dict(sliding_window=window,
              layer_types=tuple("local" if x else "global" for x in local[:period]))


def config_from_hf(hf: dict[str, Any], kind: str, common: dict[str, Any]) -> TransformerConfig:
  """A TransformerConfig from a `kind` config.json (`common`: vocabulary, activation,
  dtype, read alike for every family)."""
  _refuse(hf, kind)
  heads = hf["num_attention_heads"]
  fields = dict(
      family="decoder", max_len=hf["max_position_embeddings"], d_model=hf["hidden_size"],
      num_layers=hf["num_hidden_layers"], num_heads=heads,
      num_kv_heads=hf.get("num_key_value_heads") or heads, head_dim=hf.get("head_dim") or 0,
      d_ff=hf["intermediate_size"], mlp="swiglu", norm="rmsnorm",
      norm_eps=_read(hf, kind, "rms_norm_eps"), position="rope", use_bias=False,
      tie_embeddings=hf.get("tie_word_embeddings", kind in TIED_BY_DEFAULT))
  fields.update(FIXED[kind], **rope_from_hf(hf, kind), **_window(hf, kind))
  if kind in moe_families.ARCHITECTURES:
    fields.update(moe_families.moe_from_hf(hf, kind))
    common = {**common, **{k: fields.pop(k) for k in ("scan_layers",) if k in fields}}
  if kind in GEMMA:
    fields["attn_scale_dim"] = float(_read(hf, kind, "query_pre_attn_scalar"))
    fields["final_softcap"] = float(_read(hf, kind, "final_logit_softcapping") or 0)
    if kind == "gemma2":
      fields["attn_softcap"] = float(_read(hf, kind, "attn_logit_softcapping") or 0)
    elif hf.get("attn_logit_softcapping"):
      logging.warning("gemma3_text: attn_logit_softcapping is set, and transformers' Gemma 3 "
                      "does not apply it; neither does lmjax")
  return TransformerConfig(**fields, **common)


# ----------------------------------------------------------------------------- export


def problems(cfg: TransformerConfig, kind: str) -> list[str]:
  """What keeps `cfg` from being exported as `kind` (empty: it can be)."""
  need = dict(PLAIN, **FIXED[kind], position="rope", norm="rmsnorm", mlp="swiglu",
              use_bias=False, type_vocab_size=0, embedding_norm=False)
  if kind in GEMMA:
    del need["attn_scale_dim"], need["final_softcap"]
    if kind == "gemma2":
      del need["attn_softcap"]
    else:
      del need["rope_local_theta"]
  out = [f"model.{k}={getattr(cfg, k)!r} (needs {v!r})" for k, v in need.items()
         if getattr(cfg, k) != v] + moe_families.problems(cfg, kind)
  if kind not in HAS_HEAD_DIM and cfg.dim_per_head != cfg.d_model // cfg.num_heads:
    out.append(f"model.head_dim={cfg.head_dim} (needs d_model / num_heads)")
  if kind in ("llama", "olmo2", "olmoe") and cfg.sliding_window:
    out.append(f"model.sliding_window={cfg.sliding_window} (needs 0)")
  if kind in ("mistral", "phi3", "mixtral", "qwen3_moe") and cfg.uniform_layers is None:
    out.append(f"model.layer_types={cfg.layer_types} (needs every layer local)")
  if kind in GEMMA and not float(cfg.attn_scale_dim).is_integer():
    out.append(f"model.attn_scale_dim={cfg.attn_scale_dim} (needs a whole number)")
  if kind == "phi3" and cfg.rope_scaling != "none":
    out.append(f"model.rope_scaling={cfg.rope_scaling!r} (needs 'none')")
  return out


def infer_kind(cfg: TransformerConfig) -> str:
  """The first family that expresses `cfg` (Phi-3 only when asked for: LLaMA holds it)."""
  kinds = ("llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3_text", "olmo2", "mixtral",
           "qwen3_moe", "olmoe")
  found = {kind: problems(cfg, kind) for kind in kinds}
  for kind in kinds:
    if not found[kind]:
      return kind
  closest = min(kinds, key=lambda kind: len(found[kind]))
  raise UserError(f"this model matches no Hugging Face family; closest, {closest}: "
                  f"{', '.join(found[closest])}")


def config_to_hf(cfg: TransformerConfig, kind: str, ids: dict[str, Any]) -> dict[str, Any]:
  """config.json for a `kind` model shaped as `cfg` (its problems() must be empty)."""
  act = "gelu_pytorch_tanh" if cfg.activation == "gelu_tanh" else _act(cfg.activation)
  out = dict(
      model_type=kind, architectures=[ARCHITECTURES[kind]], vocab_size=cfg.vocab_size,
      hidden_size=cfg.d_model, intermediate_size=cfg.d_ff, num_hidden_layers=cfg.num_layers,
      num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.kv_heads,
      max_position_embeddings=cfg.max_len, rms_norm_eps=cfg.norm_eps,
      tie_word_embeddings=cfg.tie_embeddings, **rope_to_hf(cfg, kind), **ids)
  out["hidden_activation" if kind in GEMMA else "hidden_act"] = act
  if kind in HAS_HEAD_DIM:  # Mixtral's config leaves it null: d_model / num_heads
    out["head_dim"] = cfg.head_dim or None if kind == "mixtral" else cfg.dim_per_head
  if kind in ("llama", "qwen3", "olmo2", "qwen3_moe", "olmoe") + GEMMA:
    out["attention_bias"] = False
  if kind == "llama":
    out["mlp_bias"] = False
  out.update(_window_to_hf(cfg, kind))
  if kind in moe_families.ARCHITECTURES:
    out.update(moe_families.moe_to_hf(cfg, kind))
  if kind in GEMMA:
    out.update(query_pre_attn_scalar=int(cfg.attn_scale_dim or cfg.dim_per_head),
               final_logit_softcapping=cfg.final_softcap or None,
               attn_logit_softcapping=cfg.attn_softcap or None)
  return out


def _act(name: str) -> str:
  return {"gelu_exact": "gelu", "silu": "silu", "relu": "relu"}[name]


def _window_to_hf(cfg: TransformerConfig, kind: str) -> dict[str, Any]:
  if kind in ("llama", "olmo2", "olmoe"):
    return {}
  if kind in ("mistral", "phi3", "mixtral"):
    return dict(sliding_window=cfg.sliding_window or None)
  if kind == "qwen3_moe":  # one window for every layer, when used
    return dict(use_sliding_window=bool(cfg.sliding_window),
                sliding_window=cfg.sliding_window or None)
  types = ["sliding_attention" if x else "full_attention" for x in cfg.local_layers]
  if kind in GEMMA:  # Gemma's window is always set; layer_types says where it applies
    return dict(sliding_window=cfg.sliding_window or cfg.max_len, layer_types=types)
  out = dict(use_sliding_window=bool(cfg.sliding_window),
             sliding_window=cfg.sliding_window or None, layer_types=types)
  first = cfg.local_layers.index(True) if any(cfg.local_layers) else cfg.num_layers
  if all(cfg.local_layers[first:]):  # Qwen's own form: local from max_window_layers on
    out["max_window_layers"] = first
  return out
