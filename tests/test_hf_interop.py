"""Hugging Face parity: random GPT-2, BERT and LLaMA models built with `transformers` (torch,
CPU) give the same logits and final hidden states in lmjax (float32, with padding), and
export -> import is exact."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from hf_models import make_hf_model
from lmjax import pretrained
from lmjax.convert import export_hf
from lmjax.model import build_model
from lmjax.model.transformer import Transformer

BASE = {"gpt2": "transformer", "bert": "bert", "llama": "model"}


def _inputs():
  rng = np.random.default_rng(0)
  tokens = rng.integers(5, 300, size=(3, 17)).astype(np.int64)
  mask = np.ones_like(tokens)
  mask[1, 11:] = 0  # right padding
  mask[2, 5:] = 0
  return tokens, mask


@pytest.mark.parametrize("kind", ["gpt2", "bert", "llama"])
def test_imported_model_matches_transformers(tmp_path, kind):
  hf = make_hf_model(kind, str(tmp_path / kind))
  tokens, mask = _inputs()
  with torch.no_grad():
    t_tokens, t_mask = torch.tensor(tokens), torch.tensor(mask)
    want_logits = hf(input_ids=t_tokens, attention_mask=t_mask).logits.numpy()
    want_hidden = getattr(hf, BASE[kind])(input_ids=t_tokens,
                                          attention_mask=t_mask).last_hidden_state.numpy()
  source = pretrained.load(str(tmp_path / kind))
  params = jax.tree.map(jnp.asarray, source.params)
  segments = jnp.asarray(mask, jnp.int32)
  got_logits = build_model(source.model).apply({"params": params}, jnp.asarray(tokens), segments)
  got_hidden = Transformer(source.model).apply({"params": params["transformer"]},
                                               jnp.asarray(tokens), segments)
  valid = mask.astype(bool)
  np.testing.assert_allclose(np.asarray(got_hidden)[valid], want_hidden[valid], atol=1e-4,
                             rtol=1e-4)
  np.testing.assert_allclose(np.asarray(got_logits)[valid], want_logits[valid], atol=1e-4,
                             rtol=1e-4)


@pytest.mark.parametrize("kind", ["gpt2", "bert", "llama"])
def test_export_then_import_is_exact_and_loads_in_transformers(tmp_path, kind):
  import transformers
  make_hf_model(kind, str(tmp_path / "hf"), seed=1)
  source = pretrained.load(str(tmp_path / "hf"))
  export_hf(source, str(tmp_path / "out"))
  back = pretrained.load(str(tmp_path / "out"))
  assert back.model == source.model
  assert jax.tree.all(jax.tree.map(np.array_equal, back.params, source.params))
  assert back.tokenizer.sha256 == source.tokenizer.sha256
  model = transformers.AutoModelForMaskedLM if kind == "bert" else transformers.AutoModelForCausalLM
  loaded = model.from_pretrained(str(tmp_path / "out"))
  original = model.from_pretrained(str(tmp_path / "hf"))
  sd_a, sd_b = loaded.state_dict(), original.state_dict()
  assert sd_a.keys() == sd_b.keys()
  assert all(torch.equal(sd_a[k], sd_b[k]) for k in sd_a)


def test_bert_model_checkpoint_without_prefix_or_head(tmp_path):
  """`BertModel.save_pretrained` writes `embeddings.*`, `encoder.*` (no `bert.` prefix)
  and no MLM head: the backbone imports; fill-mask says what is missing."""
  import transformers

  from lmjax.errors import UserError
  from lmjax.inference.fill_mask import fill_mask
  hf = make_hf_model("bert", str(tmp_path / "mlm"))
  base = transformers.BertModel(hf.config)
  base.load_state_dict(hf.bert.state_dict(), strict=False)  # its pooler stays random
  base.save_pretrained(str(tmp_path / "base"))
  for name in ("vocab.txt", "tokenizer_config.json"):
    os.link(tmp_path / "mlm" / name, tmp_path / "base" / name)
  source = pretrained.load(str(tmp_path / "base"))
  assert "output_bias" not in source.params
  full = pretrained.load(str(tmp_path / "mlm"))
  assert jax.tree.all(jax.tree.map(np.array_equal, source.params["transformer"],
                                   full.params["transformer"]))
  with pytest.raises(UserError, match="has no MLM head"):
    fill_mask(source.model, source.params, source.tokenizer, "to be or not to <mask>")


def test_an_imported_model_computes_in_its_declared_dtype_whatever_the_cpu(tmp_path, monkeypatch):
  """A BERT (MiniLM's architecture) imported on a CPU where `auto` would pick bfloat16
  matmuls computes in float32, as its config.json declares, and stays within 1e-4 of
  transformers; a bfloat16 checkpoint computes in bfloat16; --dtype overrides both."""
  import json

  from lmjax.errors import UserError
  from lmjax import cpu_dtype
  monkeypatch.delenv(cpu_dtype.ENV, raising=False)
  monkeypatch.setattr(cpu_dtype, "cpu_flags", lambda: frozenset({"amx_bf16"}))
  monkeypatch.setattr(cpu_dtype, "measure", lambda: pytest.fail("nothing may be timed"))
  hf = make_hf_model("bert", str(tmp_path / "bert"))
  config = json.loads((tmp_path / "bert" / "config.json").read_text())
  assert config.get("dtype", config.get("torch_dtype")) == "float32"
  source = pretrained.load(str(tmp_path / "bert"))
  assert source.model.dtype == "float32" and source.model.resolved_dtype == "float32"
  tokens, mask = _inputs()
  with torch.no_grad():
    want = hf.bert(input_ids=torch.tensor(tokens),
                   attention_mask=torch.tensor(mask)).last_hidden_state.numpy()
  got = Transformer(source.model).apply({"params": source.params["transformer"]},
                                        jnp.asarray(tokens), jnp.asarray(mask, jnp.int32))
  valid = mask.astype(bool)
  np.testing.assert_allclose(np.asarray(got)[valid], want[valid], atol=1e-4, rtol=1e-4)
  assert pretrained.load(str(tmp_path / "bert"), "bfloat16").model.dtype == "bfloat16"

  for key, value, expected in (("dtype", "bfloat16", "bfloat16"),
                               ("torch_dtype", "float16", "float16"), ("dtype", None, "float32")):
    config.pop("dtype", None), config.pop("torch_dtype", None)
    if value:
      config[key] = value
    (tmp_path / "bert" / "config.json").write_text(json.dumps(config))
    assert pretrained.load(str(tmp_path / "bert")).model.dtype == expected
  config["dtype"] = "float64"
  (tmp_path / "bert" / "config.json").write_text(json.dumps(config))
  with pytest.raises(UserError, match="declares dtype 'float64'"):
    pretrained.load(str(tmp_path / "bert"))
