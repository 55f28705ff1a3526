"""Today's families, in and out of Hugging Face: Llama 3 (and a linear-scaled Llama in the
pre-5 config spelling), Mistral, Qwen2, Qwen3 (YaRN), Gemma 2, Gemma 3, Phi-3 and OLMo 2,
and the mixtures of experts Mixtral, Qwen3-MoE and OLMoE.

Each is a tiny random model built with transformers inside the test (tests/hf_models.py:
norms and biases off their initial values, windows and original contexts shorter than the
rows). lmjax's logits are within 1e-4 of transformers' in float32 on 300-token rows, one
right-padded; exported back (in shards), transformers loads the directory with no missing
or unexpected weights and gives the same logits; options lmjax lacks are one line.
"""

import json
import os
import re
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from hf_models import FAMILIES, WINDOW, load_causal_lm, make_family_model
from lmjax.convert import export_hf
from lmjax.pretrained import load as load_model
from lmjax.convert.hf import config_from_hf
from lmjax.errors import UserError
from lmjax.model import build_model

LENGTH = 300  # past every window (64) and Llama 3's original context (64)


def _rows():
  tokens = np.random.default_rng(0).integers(5, 300, size=(2, LENGTH))
  mask = np.ones_like(tokens)
  mask[1, 230:] = 0  # right padding
  return tokens, mask


def _hf_logits(model) -> np.ndarray:
  tokens, mask = _rows()
  with torch.no_grad():
    return model(input_ids=torch.tensor(tokens), attention_mask=torch.tensor(mask)).logits.numpy()


def _lmjax_logits(cfg, params) -> np.ndarray:
  tokens, mask = _rows()
  model = build_model(cfg)
  return np.asarray(jax.jit(model.apply)({"params": params}, jnp.asarray(tokens),
                                         jnp.asarray(mask, jnp.int32)))


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request, tmp_path_factory):
  name = request.param
  directory = str(tmp_path_factory.mktemp(name) / "hf")
  want = _hf_logits(make_family_model(name, directory))
  return types.SimpleNamespace(name=name, directory=directory, want=want,
                               source=load_model(directory))


def _close(got, want, tol=1e-4):
  valid = _rows()[1].astype(bool)
  np.testing.assert_allclose(got[valid], want[valid], atol=tol, rtol=tol)


def test_logits_match_transformers(family):
  _close(_lmjax_logits(family.source.model, family.source.params), family.want)


# Each option changes the logits by far more than the tolerance: the test above sees it.
# A mixture of experts' routing options sit in model.moe (a function of the model's own).
OPTIONS = {"mistral": dict(sliding_window=0), "llama3": dict(rope_scaling="none"),
           "gemma2": dict(attn_softcap=0.0), "gemma3_text": dict(rope_local_theta=0.0),
           "qwen3": dict(rope_attention_factor=1.0), "qwen2": dict(layer_types=("local",)),
           "olmo2": dict(norm_eps=1e-2), "phi3": dict(sliding_window=WINDOW + 1),
           "llama_linear_legacy": dict(rope_factor=1.0),
           "mixtral": lambda m: dict(moe=m.moe.replace(experts_per_token=1)),
           "qwen3_moe": lambda m: dict(moe=m.moe.replace(normalize_topk=False)),
           "olmoe": lambda m: dict(moe=m.moe.replace(normalize_topk=True))}


def test_each_option_read_matters(family):
  option = OPTIONS[family.name]
  model = family.source.model
  changed = model.replace(**(option(model) if callable(option) else option))
  got = _lmjax_logits(changed, family.source.params)
  valid = _rows()[1].astype(bool)
  assert np.abs(got[valid] - family.want[valid]).max() > 1e-3


def test_export_loads_in_transformers_with_the_same_logits(family, tmp_path):
  """Exported in shards of 48 KB (the index read by both sides); the family is inferred from
  the architecture, but Phi-3's, which LLaMA's layout also holds and must be asked for."""
  with open(os.path.join(family.directory, "config.json")) as f:
    model_type = json.load(f)["model_type"]
  out = str(tmp_path / "out")
  asked = "phi3" if model_type == "phi3" else None
  assert export_hf(family.source, out, asked, max_shard_bytes=48_000) == model_type
  assert os.path.isfile(os.path.join(out, "model.safetensors.index.json"))
  assert len([n for n in os.listdir(out) if n.endswith(".safetensors")]) > 2
  model, info = load_causal_lm(out, loading_info=True)
  assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
  _close(_hf_logits(model), family.want, tol=1e-5)
  back = load_model(out)
  assert back.model == family.source.model
  assert jax.tree.all(jax.tree.map(np.array_equal, back.params, family.source.params))


def test_rope_frequencies_equal_transformers():
  """lmjax's inverse frequencies and cos/sin factor for each scaling, against transformers'
  own functions on the same config."""
  import transformers as T
  from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
  from lmjax.convert.decoders import config_from_hf as decoder_config
  from lmjax.model.rope import frequencies
  for rope in ({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                "high_freq_factor": 4.0, "original_max_position_embeddings": 256},
               {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 512,
                "beta_fast": 24, "attention_factor": 1.3},
               {"rope_type": "yarn", "factor": 16.0, "original_max_position_embeddings": 256,
                "truncate": False},
               {"rope_type": "linear", "factor": 3.0}):
    hf = T.LlamaConfig(hidden_size=256, num_attention_heads=2, num_key_value_heads=2,
                       max_position_embeddings=4096, rope_parameters={**rope, "rope_theta": 5e5})
    want, want_factor = ROPE_INIT_FUNCTIONS[rope["rope_type"]](hf)
    cfg = decoder_config(hf.to_dict(), "llama", dict(vocab_size=hf.vocab_size))
    got, factor = frequencies(cfg, local=False)
    np.testing.assert_allclose(np.asarray(got), want.numpy(), rtol=2e-6, err_msg=str(rope))
    assert factor == pytest.approx(want_factor, rel=1e-6)


def test_bfloat16_checkpoint_imports(tmp_path):
  """Today's checkpoints are bfloat16, which safetensors.numpy cannot hold: read as
  ml_dtypes.bfloat16, computed in the dtype they declare."""
  model = make_family_model("mistral", str(tmp_path / "f32"))
  model.to(torch.bfloat16).save_pretrained(str(tmp_path / "bf16"))
  os.link(tmp_path / "f32" / "tokenizer.json", tmp_path / "bf16" / "tokenizer.json")
  f32, bf16 = load_model(str(tmp_path / "f32")), load_model(str(tmp_path / "bf16"))
  assert bf16.model.dtype == "bfloat16" and f32.model.dtype == "float32"
  rounded = jax.tree.map(lambda x: np.asarray(jnp.asarray(x, jnp.bfloat16), np.float32),
                         f32.params)
  assert jax.tree.all(jax.tree.map(np.array_equal, bf16.params, rounded))


BASE = dict(vocab_size=300, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
            intermediate_size=64, max_position_embeddings=128, hidden_act="silu")


@pytest.mark.parametrize("config,message", [
    (dict(model_type="llama", rope_parameters={"rope_type": "longrope", "factor": 2.0}),
     "llama: rope_type 'longrope' is not supported"),
    (dict(model_type="llama", rope_scaling={"type": "dynamic", "factor": 2.0}),
     "llama: rope_type 'dynamic' is not supported"),
    (dict(model_type="phi3", rope_scaling={"type": "su", "short_factor": [1.0]}),
     "phi3: rope_type 'longrope' is not supported"),
    (dict(model_type="llama", attention_bias=True), "llama: attention_bias: true"),
    (dict(model_type="qwen3", attention_bias=True), "qwen3: attention_bias: true"),
    (dict(model_type="llama", mlp_bias=True), "llama: mlp_bias: true"),
    (dict(model_type="phi3", partial_rotary_factor=0.75), "phi3: partial_rotary_factor 0.75"),
    (dict(model_type="qwen2", rope_parameters={"rope_type": "yarn", "factor": 4.0,
                                               "mscale_all_dim": 1.0}), "mscale_all_dim"),
    (dict(model_type="gemma3_text", rope_parameters={
        "full_attention": {"rope_type": "default"},
        "sliding_attention": {"rope_type": "linear", "factor": 2.0}}),
     "scaled RoPE on sliding-window layers"),
    (dict(model_type="gemma2", use_bidirectional_attention=True),
     "use_bidirectional_attention: true"),
    (dict(model_type="gemma3"), "model_type 'gemma3' is Gemma 3 with its vision tower"),
    (dict(model_type="llama", rope_parameters={"rope_type": "foo", "factor": 2.0}),
     "llama: rope_type 'foo' is not supported"),
    (dict(model_type="llama", rope_parameters={"rope_type": "llama3", "factor": 8.0}),
     "llama: rope_type 'llama3' needs low_freq_factor"),
    (dict(model_type="qwen3", rope_parameters={"rope_type": "yarn"}),
     "qwen3: rope_type 'yarn' needs factor"),
    (dict(model_type="mistral", rope_parameters={"rope_type": "linear", "factor": "2"}),
     "mistral: RoPE parameter factor='2' is not a number"),
    (dict(model_type="qwen2_moe"), "model_type 'qwen2_moe' is not supported"),
    (dict(model_type="olmoe", clip_qkv=8.0), "olmoe: clip_qkv: 8.0"),
])
def test_options_lmjax_lacks_are_one_line(config, message):
  with pytest.raises(UserError, match=message) as e:
    config_from_hf({**BASE, **config})
  assert "\n" not in str(e.value)


def test_both_rope_spellings_read_alike():
  new = dict(BASE, model_type="llama", rope_parameters={
      "rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0, "low_freq_factor": 1.0,
      "high_freq_factor": 4.0, "original_max_position_embeddings": 64})
  old = dict(BASE, model_type="llama", rope_theta=5e5, rope_scaling={
      "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
      "original_max_position_embeddings": 64})
  assert config_from_hf(new) == config_from_hf(old)
  assert config_from_hf(new)[1].rope_original_max_len == 64


def test_export_refuses_what_its_family_cannot_express():
  """Asked for a family that cannot hold the model, or none can: one line naming fields."""
  from lmjax.convert.hf import config_to_hf
  from lmjax.data.special import SpecialTokens
  from lmjax.model import TransformerConfig
  special = SpecialTokens(pad=0, unk=-1, bos=1, eos=2, mask=-1, cls=-1, sep=-1)
  llama = TransformerConfig(vocab_size=300, d_model=32, num_heads=4, num_layers=2, d_ff=64,
                            position="rope", norm="rmsnorm", mlp="swiglu", use_bias=False,
                            rope_scaling="linear", rope_factor=2.0, sliding_window=16)
  assert config_to_hf(llama, special)[0] == "mistral"
  cases = [(llama, "phi3", "model.rope_scaling='linear' (needs 'none')"),
           (llama, "llama", "model.sliding_window=16 (needs 0)"),
           (llama, "gemma2", "model.norm_position='pre' (needs 'sandwich')"),
           (llama.replace(qk_norm="projection"), None, "matches no Hugging Face family; "
            "closest, mistral: model.qk_norm='projection' (needs 'none')")]
  for cfg, family, message in cases:
    with pytest.raises(UserError, match=re.escape(message)):
      config_to_hf(cfg, special, family)


def test_launch_convert_keeps_a_hugging_face_inputs_family(tmp_path):
  """launch.convert on a Phi-3 directory writes Phi-3 (its own family, which inference
  would not pick), or what --family names; a family that cannot hold it, or an unknown one,
  is one line and exit status 2."""
  import subprocess
  import sys

  from tiny import ROOT
  make_family_model("phi3", str(tmp_path / "phi3"))
  run = lambda *args: subprocess.run([sys.executable, "-m", "launch.convert",
                                      f"--input={tmp_path / 'phi3'}", *args], cwd=ROOT,
                                     capture_output=True, text=True, timeout=300)
  proc = run(f"--output={tmp_path / 'out_phi3'}")
  assert proc.returncode == 0 and "identical" in proc.stdout, proc.stderr[-2000:]
  assert json.loads((tmp_path / "out_phi3" / "config.json").read_text())["model_type"] == "phi3"
  # --family=mistral is handed to the export as its family (launch/convert.py), here in
  # this process: a launcher process costs ~10 CPU-s.
  source = load_model(str(tmp_path / "phi3"))
  assert export_hf(source, str(tmp_path / "out_mistral"), "mistral") == "mistral"
  assert json.loads((tmp_path / "out_mistral" / "config.json").read_text())["model_type"] == \
      "mistral"
  proc = run(f"--output={tmp_path / 'gemma2'}", "--family=gemma2")
  assert proc.returncode == 2, proc.stderr[-2000:]
  assert proc.stderr.strip().splitlines()[-1].startswith("error: ")
  assert "cannot be exported as gemma2: model.norm_position" in proc.stderr
  assert "Traceback" not in proc.stderr
  # The other refusals are the same UserError from the export launch.convert calls, which
  # its wrapper turns into one line and exit 2 as above.
  for family, message in (("mixtral", "model.moe.num_experts=0 (needs experts)"),
                          ("qwen2_moe", "cannot export as 'qwen2_moe'")):
    with pytest.raises(UserError, match=re.escape(message)) as refused:
      export_hf(source, str(tmp_path / family), family)
    assert "\n" not in str(refused.value)


def test_keys_a_config_leaves_out_take_transformers_defaults():
  """A hand-written config.json without the keys save_pretrained writes reads as
  transformers reads it: its config class's defaults (Gemma 2's caps 30 and 50 and scalar
  256, Mistral's window 4096, Phi-3's and OLMo 2's eps 1e-5, silu or tanh GELU)."""
  gemma2 = config_from_hf(dict(BASE, model_type="gemma2", hidden_act="relu"))[1]
  assert (gemma2.final_softcap, gemma2.attn_softcap, gemma2.attn_scale_dim) == (30, 50, 256)
  assert gemma2.activation == "gelu_tanh" and gemma2.sliding_window == 4096
  assert gemma2.layer_types == ("local", "global") and gemma2.tie_embeddings
  no_act = {k: v for k, v in BASE.items() if k != "hidden_act"}
  assert config_from_hf(dict(no_act, model_type="mistral"))[1].sliding_window == 4096
  assert config_from_hf(dict(no_act, model_type="mistral"))[1].activation == "silu"
  assert config_from_hf(dict(BASE, model_type="mistral", sliding_window=None))[1].sliding_window == 0
  assert config_from_hf(dict(BASE, model_type="phi3"))[1].norm_eps == 1e-5
  assert config_from_hf(dict(BASE, model_type="olmo2"))[1].norm_eps == 1e-5
  gemma3 = config_from_hf(dict(BASE, model_type="gemma3_text", num_hidden_layers=8))[1]
  assert gemma3.layer_types == ("local",) * 5 + ("global",) and gemma3.final_softcap == 0
  assert (gemma3.rope_theta, gemma3.rope_local_theta) == (1e6, 1e4)
  qwen2 = config_from_hf(dict(BASE, model_type="qwen2", use_sliding_window=True,
                              num_hidden_layers=4, max_window_layers=3))[1]
  assert qwen2.sliding_window == 4096 and qwen2.local_layers == (False, False, False, True)
  assert config_from_hf(dict(BASE, model_type="qwen2", sliding_window=64))[1].sliding_window == 0
