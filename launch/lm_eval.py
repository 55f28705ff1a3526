"""Zero- and few-shot tasks of EleutherAI's lm-evaluation-harness on an lmjax decoder.

  python -m launch.lm_eval --workdir runs/clm_tiny --tasks hellaswag,arc_easy \
      [--include_path my_tasks/] [--num_fewshot 0] [--batch_size 8] [--limit 100] \
      [--output results/lm_eval.json]

--workdir is an lmjax run or a Hugging Face GPT-2/LLaMA directory. Tasks come from
lm-eval's registry or from YAML files under --include_path (their datasets must
be local: nothing is downloaded here). Prints lm-eval's table and writes the
results JSON to --output: any path, local or gs:// / s3://, written atomically; a
bare file name (the default, lm_eval.json) lands inside an lmjax run's --workdir,
or in the current directory for a Hugging Face model directory (never in the
model's own folder). Its directory is checked writable before the evaluation
runs. Needs the eval extra: pip install -e ".[eval]".
"""

from __future__ import annotations

import os

from absl import app, flags

from launch.cli import (cli_main, define_adapter_flag, define_dtype_flag, load_flagged_model,
                        output_path, parse_flags, write_json)
from lmjax.errors import UserError

flags.DEFINE_string("workdir", None, "an lmjax run directory or a Hugging Face model directory")
flags.DEFINE_list("tasks", None, "lm-eval task names, comma-separated")
flags.DEFINE_string("include_path", None, "folder of extra task YAML files")
flags.DEFINE_integer("num_fewshot", None, "examples in each prompt (default: the task's)",
                     lower_bound=0)
flags.DEFINE_integer("batch_size", 8, "requests per compiled batch", lower_bound=1)
flags.DEFINE_integer("limit", None, "at most this many documents per task", lower_bound=1)
flags.DEFINE_string("output", "lm_eval.json", "results JSON: any path, local or gs:// / s3://; "
                    "a bare file name goes inside an lmjax run's --workdir (the current "
                    "directory for a Hugging Face model directory)")
flags.DEFINE_bool("apply_chat_template", False, "render each request with the model's chat "
                  "template (lm-eval's own flag; few-shot examples as turns)")
flags.DEFINE_bool("log_samples", False, "keep each request and response in the output JSON")
flags.mark_flags_as_required(["workdir", "tasks"])
define_dtype_flag()
define_adapter_flag()
FLAGS = flags.FLAGS


@cli_main
def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  if FLAGS.include_path and not os.path.isdir(FLAGS.include_path):
    raise UserError(f"--include_path {FLAGS.include_path} is not a directory")
  out = output_path(FLAGS.workdir, FLAGS.output)  # a bad place fails before the evaluation
  try:
    from lm_eval.utils import handle_non_serializable, make_table
    from lmjax import harness
  except ImportError:
    raise UserError('launch.lm_eval needs lm-eval: pip install -e ".[eval]"') from None
  source = load_flagged_model()
  results = harness.run(source, FLAGS.tasks, FLAGS.num_fewshot, FLAGS.batch_size, FLAGS.limit,
                        FLAGS.include_path, FLAGS.log_samples, FLAGS.apply_chat_template)
  print(make_table(results))
  write_json(out, {"model": source.source, "dtype": source.model.resolved_dtype, **results},
             default=handle_non_serializable)
  print(f"wrote {out} ({results['compiled_shapes']} compiled shapes)")


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
