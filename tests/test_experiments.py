"""Every shipped experiment file loads, converts to typed dataclasses and builds abstractly."""

import glob
import importlib
import importlib.util
import os

import jax
import jax.numpy as jnp
import pytest

from tiny import ROOT
from lmjax.errors import UserError
from lmjax.experiment import default_config, experiment_from_dict
from lmjax.sharding import logical_to_shardings, make_mesh
from lmjax import objectives
from lmjax.train import init_state, step_fns
from lmjax.data.tokenizer import SpecialTokens

EXPERIMENTS = sorted(os.path.basename(p)[:-3] for p in glob.glob(os.path.join(ROOT, "experiments", "*.py"))
                     if not p.endswith("__init__.py"))
FINETUNING = {"finetune_genre": [None, "random"], "finetune_pairs": [None],
              "chat_tiny": [None], "dpo_tiny": [None], "qa_tiny": [None],
              "finetune_regression": [None], "grpo_tiny": [None]}  # configs for launch.finetune
VARIANTS = {"clm_tiny": [None, "llama"], "llama_1b": [None, "fsdp", "v5e16"],
            "qwen3_tiny": [None, "0.6b"], "gemma_tiny": [None, "gemma3", "2b"],
            # moe_1b's :ep8 and :capacity need 8 devices: test_compile.py compiles them.
            "moe_tiny": [None, "llama", "capacity"], "moe_1b": [None]}
CASES = [(name, arg) for name in EXPERIMENTS if name not in FINETUNING
         for arg in VARIANTS.get(name, [None])]


def test_all_experiments_are_covered():
  assert {"clm_tiny", "mlm_tiny", "gpt2_small", "bert_base", "llama_1b"} <= set(EXPERIMENTS)


@pytest.mark.parametrize("name,arg", CASES)
def test_experiment_builds_abstractly(name, arg):
  module = importlib.import_module(f"experiments.{name}")
  config = module.get_config(arg) if arg else module.get_config()
  exp = experiment_from_dict(config.to_dict())
  assert os.path.isfile(exp.data.tokenizer) and all(map(os.path.isfile, exp.data.train_files))
  assert exp.data.seq_len <= exp.model.max_len
  special = SpecialTokens(0, 1, 2, 3, 4, 5, 6)
  objective = objectives.build(exp.objective, special, exp.model.vocab_size, exp.task)
  fns = step_fns(exp.model, objective, exp.optimizer, exp.train.steps)
  abstract = jax.eval_shape(lambda: init_state(fns, 0, (1, exp.data.seq_len)))
  shardings = logical_to_shardings(abstract, make_mesh(exp.mesh), exp.mesh.rules)
  assert len(jax.tree.leaves(shardings)) == len(jax.tree.leaves(abstract))
  batch = jax.ShapeDtypeStruct((2, exp.data.seq_len), jnp.int32)
  logits = jax.eval_shape(lambda p, t: fns.eval_model.apply({"params": p}, t),
                          abstract.params, batch)
  assert logits.shape == (2, exp.data.seq_len, exp.model.vocab_size)


@pytest.mark.parametrize("name,arg", [(n, a) for n, args in FINETUNING.items() for a in args])
def test_finetuning_experiment_parses(name, arg):
  module = importlib.import_module(f"experiments.{name}")
  exp = experiment_from_dict((module.get_config(arg) if arg else module.get_config()).to_dict())
  assert objectives.objective_class(exp.objective.kind).fine_tunes
  assert exp.train.init == (arg or "pretrained")
  assert exp.task.dataset == "shakespeare_genre" or (
      os.path.isfile(exp.task.train_file) and os.path.isfile(exp.task.eval_file))


def test_all_experiment_files_are_tested():
  assert set(EXPERIMENTS) == {n for n, _ in CASES} | set(FINETUNING)


def test_default_config_covers_every_field():
  exp = experiment_from_dict(default_config())
  assert exp.to_dict() == experiment_from_dict(exp.to_dict()).to_dict()


@pytest.mark.parametrize("section,key,value,message", [
    ("optimizer", "lrr", 1, "unknown config key optimizer.lrr"),
    ("model", "d_model", "big", "model.d_model must be of type int"),
    ("train", "async_checkpoints", 1, "train.async_checkpoints must be of type bool"),
    ("model", "family", "seq2seq", "model.family must be"),
    ("mesh", "rules", (("batch", "model"),), "unknown mesh axis 'model'"),
])
def test_bad_config_values_are_user_errors(section, key, value, message):
  config = default_config()
  config[section][key] = value
  with pytest.raises(UserError, match=message):
    experiment_from_dict(config)


@pytest.mark.parametrize("script,files", [
    ("make_dialogues", ("chat_train.jsonl", "chat_eval.jsonl", "dpo_train.jsonl",
                        "dpo_eval.jsonl")),
    ("make_qa", ("qa_train.json", "qa_eval.json"))])
def test_bundled_sets_are_what_their_scripts_write(tmp_path, script, files):
  """The shipped chat, preference and QA sets come from the bundled corpus, the same bytes
  every time."""
  spec = importlib.util.spec_from_file_location(
      script, os.path.join(ROOT, "experiments", "data", f"{script}.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  module.main(str(tmp_path))
  for name in files:
    shipped = open(os.path.join(ROOT, "experiments", "data", name), "rb").read()
    assert (tmp_path / name).read_bytes() == shipped, name
