"""Checkpoints of Hugging Face `transformers`, in and out: GPT-2, BERT, and LLaMA and
the families built on it (`decoders.py`: Mistral, Qwen2, Qwen3, Gemma 2, Gemma 3, Phi-3,
OLMo 2).

A Hugging Face model directory holds `config.json` and `model.safetensors`
(or shards listed in `model.safetensors.index.json`); weights are read and
written with numpy (`weights.py`), so neither torch nor pickle is involved.
Each family is one table of (Hugging Face name, lmjax paths, conversion both
ways); the same table serves import and export, which keeps them exact inverses.
"""

from __future__ import annotations

import json
import os
import re
from typing import Any, NamedTuple

import numpy as np
from absl import logging

from lmjax.data import chat
from lmjax.data.tokenizer_io import export_tokenizer
from lmjax.errors import UserError
from lmjax.model.config import TransformerConfig
from lmjax.model.transformer import stack_layers, unstack_layers
from lmjax.convert import decoders
from lmjax.convert.tables import Entry, heads_in as _heads_in, heads_out as _heads_out
from lmjax.convert.tables import linear as _linear, norm as _norm, same as _same
from lmjax.convert.weights import MAX_SHARD_BYTES, read_safetensors, write_safetensors

ACT_FROM_HF = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu_exact",
               "silu": "silu", "swish": "silu", "relu": "relu"}
ACT_TO_HF = {"gelu_tanh": "gelu_new", "gelu_exact": "gelu", "silu": "silu", "relu": "relu"}
HF_DTYPES = ("float32", "bfloat16", "float16")  # what a config.json may declare
PREFIXES = {"gpt2": "transformer.", "bert": "bert.",
            **{kind: "model." for kind in decoders.ARCHITECTURES}}
FAMILIES = ("gpt2", "bert", *decoders.ARCHITECTURES)  # what read_hf reads, export_hf writes
# Buffers and heads lmjax has no use for; anything else left over gets a warning.
IGNORED = (".attn.bias", ".attn.masked_bias", "rotary_emb.inv_freq", "pooler.", "position_ids",
           "lm_head.weight", "cls.predictions.decoder.", "cls.seq_relationship")


def _gpt2(cfg: TransformerConfig) -> list[Entry]:
  h = cfg.num_heads
  table = [_same("wte.weight", "transformer/embed/tokens/embedding"),
           _same("wpe.weight", "transformer/embed/positions/embedding"),
           *_norm("ln_f", "transformer/final_norm")]
  for i in range(cfg.num_layers):
    a, p = f"h.{i}.", f"transformer/stack/layers_{i}/"
    qkv = tuple(f"{p}attention/{n}" for n in ("query", "key", "value"))
    table += [
        *_norm(f"{a}ln_1", f"{p}attention_norm"), *_norm(f"{a}ln_2", f"{p}mlp_norm"),
        Entry(f"{a}attn.c_attn.weight", tuple(f"{q}/kernel" for q in qkv),  # Conv1D: (in, out)
              lambda w: [x.reshape(w.shape[0], h, -1) for x in np.split(w, 3, axis=1)],
              lambda xs: np.concatenate([x.reshape(x.shape[0], -1) for x in xs], axis=1)),
        Entry(f"{a}attn.c_attn.bias", tuple(f"{q}/bias" for q in qkv),
              lambda b: [x.reshape(h, -1) for x in np.split(b, 3)],
              lambda xs: np.concatenate([x.reshape(-1) for x in xs])),
        Entry(f"{a}attn.c_proj.weight", (f"{p}attention/out/kernel",),
              lambda w: [w.reshape(h, -1, w.shape[1])], lambda xs: xs[0].reshape(-1, xs[0].shape[-1])),
        _same(f"{a}attn.c_proj.bias", f"{p}attention/out/bias"),
        _same(f"{a}mlp.c_fc.weight", f"{p}mlp/wi/kernel"), _same(f"{a}mlp.c_fc.bias", f"{p}mlp/wi/bias"),
        _same(f"{a}mlp.c_proj.weight", f"{p}mlp/wo/kernel"),
        _same(f"{a}mlp.c_proj.bias", f"{p}mlp/wo/bias")]
  return table


def _bert(cfg: TransformerConfig, with_head: bool) -> list[Entry]:
  h, e = cfg.num_heads, "embeddings."
  table = [_same(f"{e}word_embeddings.weight", "transformer/embed/tokens/embedding"),
           _same(f"{e}position_embeddings.weight", "transformer/embed/positions/embedding"),
           _same(f"{e}token_type_embeddings.weight", "transformer/embed/token_types/embedding"),
           *_norm(f"{e}LayerNorm", "transformer/embed/norm")]
  for i in range(cfg.num_layers):
    a, p = f"encoder.layer.{i}.", f"transformer/stack/layers_{i}/"
    for name in ("query", "key", "value"):
      table += [_heads_in(f"{a}attention.self.{name}.weight", f"{p}attention/{name}/kernel", h),
                _heads_in(f"{a}attention.self.{name}.bias", f"{p}attention/{name}/bias", h)]
    table += [
        _heads_out(f"{a}attention.output.dense.weight", f"{p}attention/out/kernel", h),
        _same(f"{a}attention.output.dense.bias", f"{p}attention/out/bias"),
        *_norm(f"{a}attention.output.LayerNorm", f"{p}attention_norm"),
        _linear(f"{a}intermediate.dense.weight", f"{p}mlp/wi/kernel"),
        _same(f"{a}intermediate.dense.bias", f"{p}mlp/wi/bias"),
        _linear(f"{a}output.dense.weight", f"{p}mlp/wo/kernel"),
        _same(f"{a}output.dense.bias", f"{p}mlp/wo/bias"),
        *_norm(f"{a}output.LayerNorm", f"{p}mlp_norm")]
  if with_head:  # BertForMaskedLM's head sits outside the `bert.` prefix
    table += [_linear("^cls.predictions.transform.dense.weight", "transform/kernel"),
              _same("^cls.predictions.transform.dense.bias", "transform/bias"),
              *_norm("^cls.predictions.transform.LayerNorm", "transform_norm"),
              _same("^cls.predictions.bias", "output_bias")]
  return table


def _table(kind: str, cfg: TransformerConfig, with_head: bool = True) -> list[Entry]:
  if kind in decoders.ARCHITECTURES:
    return decoders.table(cfg, kind)
  return _gpt2(cfg) if kind == "gpt2" else _bert(cfg, with_head)


# ----------------------------------------------------------------------------- configs


def config_from_hf(hf: dict[str, Any]) -> tuple[str, TransformerConfig]:
  kind = hf.get("model_type")
  get = lambda *names, default=None: next((hf[n] for n in names if hf.get(n) is not None),
                                          default)
  if kind in decoders.ARCHITECTURES:  # the key and default of the family's own config class
    key, default = decoders.ACTIVATION[kind]
    act = hf.get(key) or default
  else:
    act = get("activation_function", "hidden_act", default="gelu_new")
  if act not in ACT_FROM_HF:
    raise UserError(f"activation {act!r} is not supported (known: {', '.join(ACT_FROM_HF)})")
  common = dict(vocab_size=hf["vocab_size"], activation=ACT_FROM_HF[act], scan_layers=True,
                dtype=declared_dtype(hf))
  if kind == "gpt2":
    if hf.get("scale_attn_by_inverse_layer_idx") or hf.get("reorder_and_upcast_attn"):
      raise UserError("GPT-2 variants with per-layer attention scaling are not supported")
    d = hf["n_embd"]
    return kind, TransformerConfig(
        family="decoder", max_len=hf["n_positions"], d_model=d, num_layers=hf["n_layer"],
        num_heads=hf["n_head"], d_ff=hf.get("n_inner") or 4 * d,
        norm_eps=hf.get("layer_norm_epsilon", 1e-5), **common)
  if kind == "bert":
    if hf.get("position_embedding_type", "absolute") != "absolute":
      raise UserError("BERT with relative position embeddings is not supported")
    return kind, TransformerConfig(
        family="encoder", max_len=hf["max_position_embeddings"], d_model=hf["hidden_size"],
        num_layers=hf["num_hidden_layers"], num_heads=hf["num_attention_heads"],
        d_ff=hf["intermediate_size"], norm_eps=hf.get("layer_norm_eps", 1e-12),
        norm_position="post", embedding_norm=True, type_vocab_size=hf.get("type_vocab_size", 2),
        tie_embeddings=hf.get("tie_word_embeddings", True), **common)
  if kind in decoders.ARCHITECTURES:
    return kind, decoders.config_from_hf(hf, kind, common)
  if kind == "gemma3":
    raise UserError("model_type 'gemma3' is Gemma 3 with its vision tower; lmjax imports the "
                    "text model, model_type gemma3_text (Gemma3ForCausalLM)")
  raise UserError(f"model_type {kind!r} is not supported (lmjax imports "
                  f"{', '.join(FAMILIES)})")


def declared_dtype(hf: dict[str, Any]) -> str:
  """The dtype a checkpoint declares (`dtype`, or `torch_dtype` before transformers 5;
  float32 when absent): what transformers computes in by default, so lmjax does too,
  whatever the CPU (never `auto`, whose answer depends on the machine)."""
  name = hf.get("dtype") or hf.get("torch_dtype") or "float32"
  if name not in HF_DTYPES:
    raise UserError(f"config.json declares dtype {name!r}; lmjax computes in "
                    f"{', '.join(HF_DTYPES)} (pass --dtype to choose)")
  return name


def _require(cfg: TransformerConfig, kind: str, **fields) -> None:
  wrong = [f"model.{k}={getattr(cfg, k)!r} (needs {v!r})" for k, v in fields.items()
           if getattr(cfg, k) != v]
  if wrong:
    raise UserError(f"this model cannot be exported as {kind}: {', '.join(wrong)}")


def config_to_hf(cfg: TransformerConfig, special: Any, family: str | None = None
                 ) -> tuple[str, dict[str, Any]]:
  """(family, config.json contents) for `family`, or by default the Hugging Face class that
  matches `cfg` (an encoder: BERT; learned positions: GPT-2; else `decoders.infer_kind`)."""
  if family is not None and family not in FAMILIES:
    raise UserError(f"cannot export as {family!r} (lmjax exports {', '.join(FAMILIES)})")
  if cfg.width_mult != 1.0:
    raise UserError(f"a µP model wider than its base (d_model {cfg.d_model}, base "
                    f"{cfg.mup_base}) scales its attention and logits in ways Hugging Face "
                    "configs cannot express; it cannot be exported")
  ids = {f"{k}_token_id": (v if v >= 0 else None)
         for k, v in (("bos", special.bos), ("eos", special.eos), ("pad", special.pad))}
  if family == "bert" or (family is None and cfg.family == "encoder"):
    return "bert", _bert_config(cfg, special)
  if family == "gpt2" or (family is None and cfg.position == "learned"):
    return "gpt2", _gpt2_config(cfg, ids)
  kind = family or decoders.infer_kind(cfg)
  wrong = decoders.problems(cfg, kind) + ([] if cfg.causal else ["model.family='encoder'"])
  if wrong:
    raise UserError(f"this model cannot be exported as {kind}: {', '.join(wrong)}")
  return kind, decoders.config_to_hf(cfg, kind, ids)


# Fields that neither GPT-2 nor BERT has: at their defaults, or the export is refused.
_PLAIN = dict(decoders.PLAIN, sliding_window=0, qk_norm="none", rope_scaling="none")


def _bert_config(cfg: TransformerConfig, special: Any) -> dict[str, Any]:
  _require(cfg, "BERT", **{**_PLAIN, **dict(
      family="encoder", norm_position="post", embedding_norm=True, position="learned",
      norm="layernorm", mlp="gelu", use_bias=True, tie_embeddings=True, head_dim=0,
      num_kv_heads=0)})
  return dict(
      model_type="bert", architectures=["BertForMaskedLM"], vocab_size=cfg.vocab_size,
      hidden_size=cfg.d_model, num_hidden_layers=cfg.num_layers,
      num_attention_heads=cfg.num_heads, intermediate_size=cfg.d_ff,
      hidden_act=ACT_TO_HF[cfg.activation], max_position_embeddings=cfg.max_len,
      type_vocab_size=max(cfg.type_vocab_size, 1), layer_norm_eps=cfg.norm_eps,
      tie_word_embeddings=True, pad_token_id=special.pad)


def _gpt2_config(cfg: TransformerConfig, ids: dict[str, Any]) -> dict[str, Any]:
  _require(cfg, "GPT-2", **{**_PLAIN, **dict(
      family="decoder", position="learned", norm_position="pre", embedding_norm=False,
      norm="layernorm", mlp="gelu", use_bias=True, tie_embeddings=True, type_vocab_size=0,
      head_dim=0, num_kv_heads=0)})
  return dict(
      model_type="gpt2", architectures=["GPT2LMHeadModel"], vocab_size=cfg.vocab_size,
      n_positions=cfg.max_len, n_embd=cfg.d_model, n_layer=cfg.num_layers,
      n_head=cfg.num_heads, n_inner=cfg.d_ff, activation_function=ACT_TO_HF[cfg.activation],
      layer_norm_epsilon=cfg.norm_eps, tie_word_embeddings=True, **ids)


# ----------------------------------------------------------------------------- weights


def _nest(flat: dict[str, np.ndarray]) -> dict[str, Any]:
  tree: dict[str, Any] = {}
  for path, value in flat.items():
    *parents, leaf = path.split("/")
    node = tree
    for p in parents:
      node = node.setdefault(p, {})
    node[leaf] = value
  return tree


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, np.ndarray]:
  out = {}
  for k, v in tree.items():
    out.update(_flatten(v, f"{prefix}{k}/") if isinstance(v, dict) else {f"{prefix}{k}": v})
  return out


def _hf_name(entry_name: str, kind: str, prefixed: bool) -> str:
  """'^name' lives outside the family's prefix (heads); others inside it."""
  if entry_name.startswith("^"):
    return entry_name[1:]
  return PREFIXES[kind] + entry_name if prefixed else entry_name


class HFWeights(NamedTuple):
  """A Hugging Face checkpoint in lmjax's terms (the tokenizer is read separately)."""
  kind: str  # "gpt2", "bert" or "llama"
  config: TransformerConfig
  params: dict[str, Any]  # float32 host arrays, lmjax names, scanned layout


def read_hf(directory: str) -> HFWeights:
  """A Hugging Face directory's config.json and safetensors weights, converted;
  `lmjax.pretrained.load` adds the tokenizer."""
  try:
    with open(os.path.join(directory, "config.json"), encoding="utf-8-sig") as f:
      hf_config = json.load(f)
    kind, cfg = config_from_hf(hf_config)
  except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AttributeError) as e:
    raise UserError(f"{directory}/config.json is not a config lmjax reads "
                    f"({type(e).__name__}: {e})") from None
  tensors = read_safetensors(directory)
  prefixed = any(k.startswith(PREFIXES[kind]) for k in tensors)
  with_head = kind != "bert" or "cls.predictions.bias" in tensors
  flat, used = {}, set()
  for entry in _table(kind, cfg, with_head):
    name = _hf_name(entry.hf, kind, prefixed)
    if name not in tensors and name.endswith((".weight", ".bias")):  # old BERT: gamma/beta
      old = name[:-len(".weight")] + ".gamma" if name.endswith(".weight") else name[:-5] + ".beta"
      name = old if "LayerNorm" in name and old in tensors else name
    if name not in tensors:
      raise UserError(f"{directory}: weight {name} is missing for a {kind} model of "
                      f"{cfg.num_layers} layers")
    used.add(name)
    for path, value in zip(entry.paths, entry.to_lmjax(np.asarray(tensors[name], np.float32))):
      flat[path] = np.ascontiguousarray(value)
  unused = [k for k in tensors if k not in used and not any(s in k for s in IGNORED)]
  if unused:
    logging.warning("%s: %d weights not used, e.g. %s", directory, len(unused), unused[:3])
  params = _nest(_stack_experts(flat))
  return HFWeights(kind, cfg, stack_layers(params, cfg.num_layers) if cfg.scan_layers else params)


_EXPERT = re.compile(r"(.*)\[(\d+)\]$")  # `path[j]`: expert j of a stacked kernel


def _stack_experts(flat: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Each expert's `path[j]` array stacked into one (E, ...) array at `path`."""
  out, experts = {}, {}
  for path, value in flat.items():
    m = _EXPERT.match(path)
    if m:
      experts.setdefault(m.group(1), {})[int(m.group(2))] = value
    else:
      out[path] = value
  for path, by_index in experts.items():
    out[path] = np.stack([by_index[j] for j in range(len(by_index))])
  return out


def _param(flat: dict[str, np.ndarray], path: str) -> np.ndarray | None:
  """The array at `path`, or for `path[j]` row j of the stacked array (None if missing)."""
  m = _EXPERT.match(path)
  if m:
    stacked = flat.get(m.group(1))
    return None if stacked is None else stacked[int(m.group(2))]
  return flat.get(path)


def export_hf(source: Any, directory: str, family: str | None = None,
              max_shard_bytes: int = MAX_SHARD_BYTES) -> str:
  """Writes `source` (an `lmjax.pretrained.Pretrained`: model, params, tokenizer) as a
  directory `transformers` loads, as `family` (by default the one `config_to_hf` infers),
  in shards past `max_shard_bytes`; returns the family."""
  cfg = source.model
  kind, hf_config = config_to_hf(cfg, source.tokenizer.special, family)
  # The weights are written in float32; the declared dtype is what lmjax computed in where
  # that is one transformers knows (`auto` and bfloat16_matmuls: float32).
  hf_config["dtype"] = cfg.dtype if cfg.dtype in HF_DTYPES else "float32"
  params = unstack_layers(source.params, cfg.num_layers) if cfg.scan_layers else source.params
  flat = _flatten(params)
  with_head = "output_bias" in flat
  tensors = {}
  for entry in _table(kind, cfg, with_head):
    missing = [p for p in entry.paths if _param(flat, p) is None]
    if missing and kind == "bert" and entry.paths[0].startswith("transformer/embed/token_types"):
      flat[entry.paths[0]] = np.zeros((1, cfg.d_model), np.float32)  # no token types: one zero row
    elif missing:
      raise UserError(f"cannot export: parameter {missing[0]} is missing")
    value = entry.to_hf([np.asarray(_param(flat, p), np.float32) for p in entry.paths])
    tensors[_hf_name(entry.hf, kind, True)] = np.ascontiguousarray(value)
  if not with_head and kind == "bert":
    hf_config["architectures"] = ["BertModel"]
  os.makedirs(directory, exist_ok=True)
  write_safetensors(tensors, directory, max_shard_bytes)
  with open(os.path.join(directory, "config.json"), "w") as f:
    json.dump(hf_config, f, indent=2)
  if kind != "bert":
    with open(os.path.join(directory, "generation_config.json"), "w") as f:
      json.dump(generation_config(source), f, indent=2)
  export_tokenizer(source.tokenizer, directory)
  return kind


def generation_config(source: Any) -> dict[str, Any]:
  """generation_config.json of an export: the source's own (a Hugging Face model's, or the
  one a run fine-tuned from it kept: sampling defaults, several eos ids) over its tokenizer's
  bos/eos/pad ids; a chat template's end-of-turn id joins the eos ids, so that transformers'
  `generate` ends a reply where lmjax's does. Without either it is config.json's ids, marked
  as transformers marks the copy it derives from config.json."""
  special, tok = source.tokenizer.special, source.tokenizer
  out = dict(getattr(source, "generation", None) or {})
  added = not out
  for name in ("bos", "eos", "pad"):
    if out.get(f"{name}_token_id") is None and getattr(special, name) >= 0:
      out[f"{name}_token_id"] = getattr(special, name)
  if getattr(tok, "chat_template", None):
    eos = out.get("eos_token_id")
    ids = list(eos) if isinstance(eos, list) else [] if eos is None else [eos]
    end = chat.load_template(tok).end_of_turn(tok)
    if end >= 0 and end not in ids:
      out["eos_token_id"], added = ids + [end], False
      out.pop("_from_model_config", None)  # transformers would take config.json's ids
  if added:
    out["_from_model_config"] = True
  return out
