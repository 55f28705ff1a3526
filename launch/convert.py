"""Exports an lmjax run (or re-exports a Hugging Face directory) for `transformers`.

  python -m launch.convert --input runs/clm_tiny --output exported/clm_tiny

The output directory gets config.json, model.safetensors (shards and their index past
--max_shard_mb) and the tokenizer; it loads with the transformers class of its family:
the one named by --family, else a Hugging Face input's own, else the first that matches
the architecture (gpt2, bert, llama, mistral, qwen2, qwen3, gemma2, gemma3_text, olmo2;
phi3 only when named). Hugging Face directories need no import step: every
lmjax launcher (generate, fill_mask, evaluate, finetune, train --init_from)
reads them directly. After writing, the export is read back and compared.
"""

from __future__ import annotations

import json
import os

import jax
import numpy as np
from absl import app, flags

from launch.cli import cli_main, parse_flags
from lmjax.errors import UserError

flags.DEFINE_string("input", None, "an lmjax run directory or a Hugging Face directory")
flags.DEFINE_string("output", None, "new directory for the Hugging Face files")
flags.DEFINE_string("family", "", "the Hugging Face model_type to write (default: the "
                    "input's own if it is a Hugging Face directory, else inferred)")
flags.DEFINE_integer("max_shard_mb", 5 * 1024, "weights past this size are written in shards")
flags.DEFINE_bool("adapter_only", False, "a LoRA run: write its adapters as a PEFT adapter "
                  "directory (adapter_config.json, adapter_model.safetensors) for its base, "
                  "instead of the merged weights")
flags.mark_flags_as_required(["input", "output"])
FLAGS = flags.FLAGS


@cli_main
def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  if os.path.exists(FLAGS.output) and os.listdir(FLAGS.output):
    raise UserError(f"--output {FLAGS.output} exists and is not empty; choose a new directory")
  if FLAGS.adapter_only:
    export_adapter(FLAGS.input, FLAGS.output, FLAGS.family)
    return
  from lmjax import pretrained
  from lmjax.convert import export_hf
  from lmjax.model import stack_layers
  source = pretrained.load(FLAGS.input)
  family = FLAGS.family or _own_family(FLAGS.input)
  if FLAGS.max_shard_mb < 1:
    raise UserError(f"--max_shard_mb must be >= 1, got {FLAGS.max_shard_mb}")
  kind = export_hf(source, FLAGS.output, family, FLAGS.max_shard_mb * 1024 ** 2)
  back = pretrained.load(FLAGS.output)
  # Compared in one layout: an unrolled run (layers_0..) reads back scanned.
  layout = lambda params: stack_layers(params, source.model.num_layers)
  same = jax.tree.all(jax.tree.map(np.array_equal, layout(back.params), layout(source.params)))
  if not same:
    raise UserError(f"{FLAGS.output}: reading the export back gave different weights")
  if back.tokenizer.sha256 != source.tokenizer.sha256:
    raise UserError(f"{FLAGS.output}: reading the export back gave a different tokenizer")
  declared = back.model.dtype  # config.json's dtype: what transformers will compute in
  print(f"wrote {FLAGS.output} ({kind}, float32 weights, declared dtype {declared}, from "
        f"{source.source}); read back: identical")


def export_adapter(run: str, output: str, family: str) -> None:
  """A LoRA run's adapters as a PEFT adapter directory that `peft.PeftModel.from_pretrained`
  loads onto the run's base (its Hugging Face form: the base itself, or its export)."""
  from lmjax import lora, pretrained
  from lmjax.lora import peft, runs
  from lmjax.model.config import TransformerConfig
  if pretrained.is_hf_dir(run):
    raise UserError(f"--adapter_only exports an lmjax LoRA run's adapters; {run} is a "
                    "Hugging Face directory")
  adapters, meta, step = pretrained.read_run(run)
  if runs.BASE_KEY not in meta:
    raise UserError(f"--adapter_only: {run} was trained without lora (its checkpoints hold "
                    "every weight); export it merged, without --adapter_only")
  extra = [k for k in _names(adapters) if not lora.is_adapter(k)]
  if extra:
    raise UserError(f"--adapter_only: {run} also trained {extra[0]} in full (a new head), "
                    "which a PEFT adapter of a causal LM does not hold; export it merged")
  base = pretrained.lora_base(meta, run)
  cfg = pretrained.lora_config(meta)
  model = TransformerConfig(**meta["config"]["model"])
  modules = peft.export(adapters, model, family or peft.family(base), cfg, output,
                        meta[runs.BASE_KEY]["path"])
  print(f"wrote {output} (PEFT LoRA adapter of {len(modules)} modules, r={cfg.rank}, "
        f"alpha={cfg.alpha:g}, from {run} step {step}, for the base "
        f"{meta[runs.BASE_KEY]['path']})")


def _names(tree) -> list[str]:
  from lmjax.pretrained import param_name
  return [param_name(k) for k, _ in jax.tree_util.tree_leaves_with_path(tree)]


def _own_family(path: str) -> str | None:
  """A Hugging Face input's model_type: exported back as itself (Phi-3 stays Phi-3)."""
  from lmjax import pretrained
  if not pretrained.is_hf_dir(path):
    return None
  with open(os.path.join(path, "config.json")) as f:
    return json.load(f).get("model_type")


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
