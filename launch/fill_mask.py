"""The most likely tokens at each <mask>, from an encoder run or a Hugging Face BERT.

  python -m launch.fill_mask --workdir runs/mlm_tiny --text "To be, or not to <mask>" [--top_k 5]
"""

from __future__ import annotations

from absl import app, flags

from launch.cli import cli_main, define_dtype_flag, parse_flags

flags.DEFINE_string("workdir", None, "an lmjax run directory or a Hugging Face model directory")
flags.DEFINE_string("text", None, "text with one or more <mask>")
flags.DEFINE_integer("top_k", 5, "candidates shown per mask", lower_bound=1)
flags.mark_flags_as_required(["workdir", "text"])
define_dtype_flag()
FLAGS = flags.FLAGS


@cli_main
def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  from lmjax.inference.fill_mask import fill_mask
  from lmjax import pretrained
  source = pretrained.load(FLAGS.workdir, FLAGS.dtype, announce=True)
  results = fill_mask(source.model, source.params, source.tokenizer, FLAGS.text, FLAGS.top_k)
  for i, candidates in enumerate(results):
    print(f"<mask> {i + 1}:")
    for token, prob in candidates:
      print(f"  {prob:7.4f}  {source.tokenizer.decode([token])!r}")


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
