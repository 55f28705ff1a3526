"""The mixture-of-experts families in Hugging Face's layout: Mixtral (`mixtral`: Mistral's
attention, every layer sparse), Qwen3-MoE (`qwen3_moe`: Qwen3's per-head query/key norms,
sparse layers by `decoder_sparse_step` and `mlp_only_layers`, experts of their own width)
and OLMoE (`olmoe`: query/key norms over the whole projection).

`decoders.py` reads and writes their attention, norms and RoPE as it does for the dense
families; this module adds the `model.moe` settings and the sparse layers' weights: the
router (`gate`) and one gate/up/down projection per expert, as `save_pretrained` writes
them (its "original format"), stacked into lmjax's (E, D, F) expert kernels by
`tables.expert_linear`.
"""

from __future__ import annotations

from typing import Any

from absl import logging

from lmjax.convert.tables import Entry, expert_linear, linear
from lmjax.errors import UserError
from lmjax.model.config import MoEConfig, TransformerConfig

ARCHITECTURES = {"mixtral": "MixtralForCausalLM", "qwen3_moe": "Qwen3MoeForCausalLM",
                 "olmoe": "OlmoeForCausalLM"}
PREFIX = {"mixtral": "block_sparse_moe.", "qwen3_moe": "mlp.", "olmoe": "mlp."}
PROJECTIONS = {"mixtral": ("w1", "w3", "w2")}  # gate, up, down; others: *_proj
# transformers' defaults for the keys a config.json may leave out.
DEFAULTS = {"mixtral": dict(num_local_experts=8, num_experts_per_tok=2,
                            router_aux_loss_coef=0.001),
            "qwen3_moe": dict(num_experts=128, num_experts_per_tok=8, moe_intermediate_size=768,
                              norm_topk_prob=False, router_aux_loss_coef=0.001,
                              decoder_sparse_step=1),
            "olmoe": dict(num_experts=64, num_experts_per_tok=8, norm_topk_prob=False,
                          router_aux_loss_coef=0.01)}


def _get(hf: dict[str, Any], kind: str, key: str) -> Any:
  if key in ("num_experts", "num_local_experts"):  # either spelling (attribute_map)
    found = hf.get("num_local_experts", hf.get("num_experts"))
    return found if found is not None else DEFAULTS[kind][key]
  return hf[key] if hf.get(key) is not None else DEFAULTS[kind][key]


def moe_from_hf(hf: dict[str, Any], kind: str) -> dict[str, Any]:
  """TransformerConfig fields of a sparse family's config.json: `moe`, the dense layers'
  `d_ff`, and an unrolled stack when dense and sparse layers mix (Qwen3-MoE)."""
  if hf.get("clip_qkv"):
    raise UserError(f"{kind}: clip_qkv: {hf['clip_qkv']} (clamped q, k, v) is not supported")
  if hf.get("router_jitter_noise"):
    logging.warning("%s: router_jitter_noise=%s (training-time input noise) is not applied "
                    "by lmjax", kind, hf["router_jitter_noise"])
  n = hf["num_hidden_layers"]
  experts = _get(hf, kind, "num_experts" if kind != "mixtral" else "num_local_experts")
  moe = dict(num_experts=experts, experts_per_token=_get(hf, kind, "num_experts_per_tok"),
             normalize_topk=True if kind == "mixtral" else bool(_get(hf, kind, "norm_topk_prob")),
             balance_loss=float(_get(hf, kind, "router_aux_loss_coef")), z_loss=0.0)
  fields: dict[str, Any] = dict(d_ff=hf["intermediate_size"])
  if kind == "qwen3_moe":
    moe["d_ff"] = _get(hf, kind, "moe_intermediate_size")
    step, dense = _get(hf, kind, "decoder_sparse_step"), set(hf.get("mlp_only_layers") or ())
    sparse = [i for i in range(n) if i not in dense and (i + 1) % step == 0]
    if dense:
      moe["layers"] = tuple(sparse)
    else:
      moe["every"] = step
    if len(sparse) not in (0, n):
      fields["scan_layers"] = False  # a scanned stack repeats one kind of layer
  fields["moe"] = MoEConfig(**moe)
  return fields


def experts_table(cfg: TransformerConfig, kind: str, a: str, p: str) -> list[Entry]:
  """A sparse layer's weights: Hugging Face names under `a` (the layer's prefix), lmjax
  paths under `p` (the layer's)."""
  m = f"{a}{PREFIX[kind]}"
  gate, up, down = PROJECTIONS.get(kind, ("gate_proj", "up_proj", "down_proj"))
  out = [linear(f"{m}gate.weight", f"{p}mlp/router/kernel")]
  for j in range(cfg.moe.num_experts):
    e = f"{m}experts.{j}."
    out += [expert_linear(f"{e}{gate}.weight", f"{p}mlp/experts/gate/kernel", j),
            expert_linear(f"{e}{up}.weight", f"{p}mlp/experts/up/kernel", j),
            expert_linear(f"{e}{down}.weight", f"{p}mlp/experts/wo/kernel", j)]
  return out


def problems(cfg: TransformerConfig, kind: str) -> list[str]:
  """What keeps `cfg`'s routed MLPs from being written as `kind` (empty: they can be);
  a dense family needs a dense model."""
  m = cfg.moe
  if kind not in ARCHITECTURES:
    return [f"model.moe.num_experts={m.num_experts} (needs 0)"] if m.num_experts else []
  out = [] if m.num_experts else ["model.moe.num_experts=0 (needs experts)"]
  if m.shared_experts or m.shared_d_ff:
    out.append("model.moe.shared_experts (needs none)")
  normalized = m.router == "topk_softmax" or m.normalize_topk
  if kind == "mixtral" and not normalized:
    out.append("model.moe.normalize_topk=False (needs True)")
  if kind != "qwen3_moe" and not all(cfg.sparse_layers):
    out.append("model.moe.every/layers (needs every layer sparse)")
  if kind != "qwen3_moe" and cfg.expert_d_ff != cfg.d_ff:
    out.append(f"model.moe.d_ff={m.d_ff} (needs model.d_ff)")
  return out


def moe_to_hf(cfg: TransformerConfig, kind: str) -> dict[str, Any]:
  """config.json's keys for `cfg`'s routed MLPs as `kind`."""
  m = cfg.moe
  out = dict(num_experts_per_tok=m.experts_per_token, router_aux_loss_coef=m.balance_loss,
             output_router_logits=False, intermediate_size=cfg.expert_d_ff)
  out["num_local_experts" if kind == "mixtral" else "num_experts"] = m.num_experts
  if kind != "mixtral":
    out["norm_topk_prob"] = m.router == "topk_softmax" or m.normalize_topk
  if kind == "qwen3_moe":
    sparse = cfg.sparse_layers
    step = m.every if not m.layers else 1
    out.update(intermediate_size=cfg.d_ff, moe_intermediate_size=cfg.expert_d_ff,
               decoder_sparse_step=step,
               mlp_only_layers=[i for i, s in enumerate(sparse) if not s and (i + 1) % step == 0])
  if kind == "mixtral":
    out["router_jitter_noise"] = 0.0
  return out
