"""Evaluates a run (or a Hugging Face model) on text files; prints and writes JSON.

  python -m launch.evaluate --workdir runs/clm_tiny --data lmjax/assets/shakespeare/valid.txt \
      [--seq_len 0 --batch_size 8 --max_batches 0 --output results/clm_tiny.json]

Loss, perplexity (CLM), token or masked-token accuracy (MLM) and the number of
tokens evaluated. --output is any path, local or gs:// / s3://, written
atomically; a bare file name (the default, evaluation.json) lands inside an lmjax
run's --workdir, or in the current directory for a Hugging Face model directory.
The same rule as `launch.lm_eval --output`.
"""

from __future__ import annotations

import json

from absl import app, flags, logging

from launch.cli import (cli_main, define_adapter_flag, define_dtype_flag, load_flagged_model,
                        output_path, parse_flags, write_json)

flags.DEFINE_string("workdir", None, "an lmjax run directory or a Hugging Face model directory")
flags.DEFINE_multi_string("data", None, ".txt or .jsonl files to evaluate on (repeatable)")
flags.DEFINE_integer("seq_len", 0, "tokens per row (0: the model's max_len, at most 512)",
                     lower_bound=0)
flags.DEFINE_integer("batch_size", 8, "rows per batch", lower_bound=1)
flags.DEFINE_integer("max_batches", 0, "stop after this many batches (0: all)", lower_bound=0)
flags.DEFINE_integer("seed", 0, "MLM masking seed", lower_bound=0)
flags.DEFINE_string("output", "evaluation.json", "JSON file to write: any path, local or "
                    "gs:// / s3://; a bare file name goes inside an lmjax run's --workdir (the "
                    "current directory for a Hugging Face model directory)")
flags.mark_flags_as_required(["workdir", "data"])
define_dtype_flag()
define_adapter_flag()
FLAGS = flags.FLAGS


@cli_main
def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  out = output_path(FLAGS.workdir, FLAGS.output)  # a bad place fails before the evaluation
  from lmjax.evaluation import evaluate_files
  source = load_flagged_model()
  metrics = evaluate_files(source, FLAGS.data, FLAGS.seq_len, FLAGS.batch_size,
                           FLAGS.max_batches, FLAGS.seed)
  result = {"model": source.source, "dtype": source.model.resolved_dtype, "data": FLAGS.data,
            **metrics}
  print(json.dumps(result, indent=2))
  write_json(out, result)
  logging.info("wrote %s", out)


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
