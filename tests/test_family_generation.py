"""Today's families generate as transformers' `generate` does, and read generation_config.json.

Each family's tiny random model (tests/hf_models.py) continues a 113-token prompt greedily for
40 tokens (past every sliding window, 64, and Llama 3's original context, 64): the serving
Engine (launch.serve) and lmjax's Generator (launch.generate, chat, lm-eval) give
transformers' tokens, and launch.generate and launch.serve themselves on Gemma 3 (local and
global layers with their own RoPE bases, a final soft-cap). Each directory's
generation_config.json names two eos ids, the second one a token transformers produces, and
sampling defaults (do_sample, temperature 0.7, top_p 0.8, top_k 20): generation stops where
transformers' stops, the launchers take the defaults unless a flag or a request sets them,
and the export writes the file back.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import types

import jax
import numpy as np
import pytest
import torch

from hf_models import FAMILIES, make_family_model
from lmjax import pretrained
from lmjax.errors import UserError
from lmjax.inference import generation_config
from lmjax.inference.engine import Engine, generate_all
from lmjax.inference.generate import Generator, SamplingConfig
from tiny import ROOT

NEW = 40
TEXT = ("First Citizen:\nBefore we proceed any further, hear me speak.\nAll:\nSpeak, speak.\n"
        "First Citizen:\nYou are all resolved rather to die than to famish?\n")
SAMPLING = dict(do_sample=True, temperature=0.7, top_p=0.8, top_k=20)
# Llama 3's linear-scaled twin differs only in its config's spelling (tests/test_families.py)
NAMES = [n for n in FAMILIES if n != "llama_linear_legacy"]


def _hf_generate(model, prompt: list[int], eos, logits: bool = False):
  """transformers' greedy tokens (and with `logits` the (NEW, V) logits of each step)."""
  with torch.no_grad():
    out = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt),
                         dtype=torch.long), max_new_tokens=NEW, do_sample=False,
                         eos_token_id=eos, pad_token_id=0, output_logits=True,
                         return_dict_in_generate=True)
  tokens = out.sequences[0, len(prompt):].tolist()
  return (tokens, np.stack([x[0].numpy() for x in out.logits])) if logits else tokens


def _second_eos(tokens: list[int]) -> int:
  """The token of `tokens` met first the latest (tiny random models soon loop; Gemma 2's
  repeats one token): an eos id that ends them there."""
  return next(tokens[k] for k in range(len(tokens) - 1, -1, -1)
              if tokens[k] not in tokens[:k] and tokens[k] != 2)


@pytest.fixture(scope="module", params=NAMES)
def family(request, tmp_path_factory):
  """The family's directory with a generation_config.json naming eos ids [2, stop]; its
  prompt; transformers' 40 greedy tokens without eos and its tokens with the eos ids."""
  name = request.param
  directory = str(tmp_path_factory.mktemp(name) / "hf")
  model = make_family_model(name, directory)
  source = pretrained.load(directory)
  prompt = [source.tokenizer.special.bos] + source.tokenizer.encode([TEXT])[0]
  assert len(prompt) > 64
  free, logits = _hf_generate(model, prompt, None, logits=True)
  eos = [2, _second_eos(free)]
  with open(os.path.join(directory, "generation_config.json"), "w") as f:
    json.dump(dict(SAMPLING, bos_token_id=1, eos_token_id=eos, pad_token_id=0), f)
  stopped = _hf_generate(model, prompt, eos)
  assert stopped[-1] in eos and len(stopped) < NEW
  return types.SimpleNamespace(name=name, directory=directory, prompt=prompt, free=free,
                               logits=logits, eos=eos, want=stopped[:-1],
                               source=pretrained.load(directory))


def test_each_decode_steps_logits_equal_transformers(family):
  """The KV-cache decoder's logits at each of the 40 steps, fed transformers' tokens, within
  1e-4 of transformers' own (measured: 3.6e-7 to 1.4e-6, Gemma 3 the largest)."""
  from lmjax.inference.decoder import Decoder
  dec = Decoder(family.source.model, family.source.params, "")
  forward = jax.jit(dec.forward)
  p = len(family.prompt)
  ids = np.array([family.prompt + family.free[:-1]], np.int32)
  logits, cache = forward(dec.params, dec.init_cache(1, p + NEW), ids[:, :p],
                          np.ones((1, p), np.int32), np.arange(p)[None])
  got = [logits[0, -1]]
  for t in range(p, p + NEW - 1):
    logits, cache = forward(dec.params, cache, ids[:, t:t + 1], np.ones((1, 1), np.int32),
                            np.array([[t]]))
    got.append(logits[0, -1])
  np.testing.assert_allclose(np.stack(got), family.logits, atol=1e-4, rtol=1e-4)


# Each family's decoding math is checked step by step above (Decoder.forward, which the
# Engine and the Generator both run); their own code differs by family only where a cache
# holds windowed layers or a layer routes to experts. So each family goes through one of the
# two (each compiles its programs, ~4 CPU-s a family), and each of them sees plain, windowed
# and mixture-of-experts families. Gemma 3 goes through both here, and through launch.generate
# and launch.serve below.
ENGINE_FAMILIES = {"llama3", "olmo2", "mistral", "gemma2", "gemma3_text", "qwen3_moe"}
GENERATOR_FAMILIES = {"qwen3", "qwen2", "phi3", "mixtral", "olmoe", "gemma3_text"}


def test_greedy_tokens_equal_transformers_generate(family):
  """The Engine (the server's) without eos ids gives transformers' 40 tokens; the Generator
  with generation_config.json's eos ids stops where transformers stops."""
  assert ENGINE_FAMILIES | GENERATOR_FAMILIES == set(NAMES)
  src = family.source
  defaults = generation_config.for_model(src)
  assert defaults.eos_ids == tuple(family.eos)
  pad = max(src.tokenizer.special.pad, 0)
  if family.name in ENGINE_FAMILIES:
    engine = Engine(src.model, src.params, pad=pad, slots=1, chunk=64, max_len=160)
    engine.start()
    try:
      assert generate_all(engine, [family.prompt], NEW) == [family.free]
    finally:
      engine.stop()
  if family.name in GENERATOR_FAMILIES:
    gen = Generator(src.model, src.params, eos=defaults.eos_ids, pad=pad)
    assert gen.generate([family.prompt], SamplingConfig(NEW, temperature=0.0)) == [family.want]


def test_export_keeps_the_generation_config(family, tmp_path):
  """launch.convert's export (lmjax.convert.export_hf) writes the model's
  generation_config.json: transformers reads its eos ids and sampling defaults back."""
  import transformers as T
  from lmjax.convert import export_hf
  export_hf(family.source, str(tmp_path), "phi3" if family.name == "phi3" else None)
  got = T.GenerationConfig.from_pretrained(str(tmp_path))
  assert got.eos_token_id == family.eos
  assert (got.do_sample, got.temperature, got.top_p, got.top_k) == (True, 0.7, 0.8, 20)
  assert pretrained.load(str(tmp_path)).generation == family.source.generation


def _directory(tmp_path_factory, name: str = "gemma3_text"):
  """Gemma 3's directory as the family fixture writes it (local and global layers, their
  own RoPE bases, a window shorter than the text, final soft-cap), with transformers' tokens."""
  directory = str(tmp_path_factory.mktemp("launch") / name)
  model = make_family_model(name, directory)
  tok = pretrained.load(directory).tokenizer
  prompt = [tok.special.bos] + tok.encode([TEXT])[0]
  free = _hf_generate(model, prompt, None)
  eos = [2, _second_eos(free)]
  with open(os.path.join(directory, "generation_config.json"), "w") as f:
    json.dump(dict(SAMPLING, repetition_penalty=1.1, eos_token_id=eos, pad_token_id=0), f)
  want = _hf_generate(model, prompt, eos)[:-1]
  return directory, tok, want


@pytest.fixture(scope="module")
def launched(tmp_path_factory):
  return _directory(tmp_path_factory)


def test_launch_generate_equals_transformers_and_takes_the_files_defaults(launched):
  """--temperature 0 (a flag given) is greedy and stops at the second eos id; without
  sampling flags the file's defaults are used (logged, and the same tokens as launch.generate's
  Generator gives with those values set, at the same seed), its repetition_penalty named as
  not applied."""
  directory, tok, want = launched
  run = lambda *args: subprocess.run(
      [sys.executable, "-m", "launch.generate", f"--workdir={directory}", f"--prompt={TEXT}",
       f"--max_new_tokens={NEW}", "--seed=4", *args], cwd=ROOT, capture_output=True, text=True,
      timeout=300)
  greedy = run("--temperature=0")
  assert greedy.returncode == 0, greedy.stderr[-2000:]
  assert greedy.stdout == TEXT + tok.decode(want) + "\n"
  default = run()
  assert "temperature 0.7, top_p 0.8, top_k 20" in default.stderr, default.stderr[-2000:]
  assert "not applied (lmjax has no such option): repetition_penalty=1.1" in default.stderr
  source = pretrained.load(directory)  # what launch.generate runs, the values given
  gen = Generator(source.model, source.params, eos=generation_config.for_model(source).eos_ids,
                  pad=max(tok.special.pad, 0))
  prompt = [tok.special.bos] + tok.encode([TEXT])[0]
  given = gen.generate([prompt], SamplingConfig(NEW, temperature=0.7, top_k=20, top_p=0.8), 4)
  assert default.stdout == TEXT + tok.decode(given[0]) + "\n" != greedy.stdout


def test_launch_serve_equals_transformers_and_takes_the_files_defaults(launched, tmp_path):
  """A request's temperature 0 is greedy and finishes with "stop" at the second eos id; a
  request that leaves the sampling fields out gets the file's, one that sets them its own."""
  import httpx

  from lmjax.inference.serve_process import spawn
  directory, tok, want = launched
  with open(tmp_path / "stderr.txt", "w") as log:
    proc, url = spawn(directory, "--max_batch=2", "--prefill_chunk=32", "--max_len=160",
                      log=log)
  try:
    def complete(**body):
      r = httpx.post(url + "/v1/completions", timeout=120,
                     json=dict(prompt=TEXT, max_tokens=NEW, seed=4, **body))
      assert r.status_code == 200, r.text
      return r.json()["choices"][0]
    greedy = complete(temperature=0)
    assert (greedy["text"], greedy["finish_reason"]) == (tok.decode(want), "stop")
    default, given = complete(), complete(temperature=0.7, top_p=0.8, top_k=20)
    openai = complete(temperature=1.0, top_p=1.0, top_k=0)
    assert default["text"] == given["text"] != openai["text"]
  finally:
    os.killpg(proc.pid, signal.SIGTERM)
    assert proc.wait(60) == 0
  assert "request defaults from" in (tmp_path / "stderr.txt").read_text()


@pytest.mark.parametrize("raw,want", [
    ({}, dict(temperature=0.0, top_p=1.0, top_k=0, eos_ids=(7,), source="")),
    ({"_from_model_config": True, "eos_token_id": 3, "do_sample": True},
     dict(temperature=0.0, eos_ids=(3,), source="")),
    ({"eos_token_id": [5, 6, 5]}, dict(temperature=0.0, eos_ids=(5, 6), source="gc")),
    ({"do_sample": True}, dict(temperature=1.0, top_p=1.0, top_k=50, eos_ids=(7,))),
    ({"do_sample": True, "temperature": 0.6, "top_p": 0.9, "top_k": None},
     dict(temperature=0.6, top_p=0.9, top_k=50)),
    ({"do_sample": False, "temperature": 0.6, "num_beams": 4, "repetition_penalty": 1.0},
     dict(temperature=0.0, ignored=("num_beams=4",))),
])
def test_generation_config_reads_as_transformers_reads_it(raw, want):
  """Sampling only with do_sample, transformers' fill-ins (1, 50, 1) then; eos ids a list or
  one, the tokenizer's when it names none; a save_pretrained copy of config.json gives
  eos ids only; options lmjax lacks are named."""
  got = generation_config.defaults(raw, eos=7, source="gc")
  assert {k: getattr(got, k) for k in want} == want


@pytest.mark.parametrize("raw,message", [
    ({"eos_token_id": "</s>"}, "eos_token_id must be a token id or a list"),
    ({"do_sample": True, "top_p": 0}, r"top_p 0.0 in \(0, 1\]"),
    ({"do_sample": True, "temperature": "hot"}, "must be numbers"),
])
def test_a_bad_generation_config_is_one_line(raw, message):
  with pytest.raises(UserError, match=message) as e:
    generation_config.defaults(raw, eos=7)
  assert "\n" not in str(e.value)


def test_export_adds_a_chat_templates_end_of_turn_to_the_eos_ids(tmp_path):
  """A model whose chat template ends a turn with a token other than its eos ids (here a
  blank line) exports with that token among its eos ids, so transformers' generate ends a
  reply where launch.generate --chat and launch.serve do; a model without a template and
  without a generation_config.json exports config.json's ids, marked as derived from it."""
  import transformers as T
  from lmjax.convert.hf import generation_config as export_generation_config
  make_family_model("mistral", str(tmp_path))
  os.remove(tmp_path / "generation_config.json")
  plain = pretrained.load(str(tmp_path))
  assert export_generation_config(plain) == {"bos_token_id": 1, "eos_token_id": 2,
                                             "pad_token_id": 2, "_from_model_config": True}
  (tmp_path / "chat_template.jinja").write_text(
      "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n\n{% endfor %}"
      "{% if add_generation_prompt %}assistant: {% endif %}")
  (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 7]}))
  source = pretrained.load(str(tmp_path))
  from lmjax.data.chat import load_template
  end = load_template(source.tokenizer).end_of_turn(source.tokenizer)
  assert end not in (2, 7)
  from lmjax.convert import export_hf
  export_hf(source, str(tmp_path / "out"))
  assert T.GenerationConfig.from_pretrained(str(tmp_path / "out")).eos_token_id == [2, 7, end]
