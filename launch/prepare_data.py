"""Prepares a corpus as it ships into a token store that every host trains from.

  python -m launch.prepare_data --input 'fineweb/data/**/*.parquet' \
      --tokenizer tok.model --output stores/fineweb [--objective clm|mlm] \
      [--workers N] [--engine local|ray] [--ray_address auto] [--text_field text]

Inputs are files, directories or globs of .txt, .jsonl, .jsonl.gz/.json.gz,
.jsonl.zst and .parquet. Run it again to finish an interrupted preparation or to
add inputs: complete shards are verified and kept. Then point
`--config.data.train_files` at the output directory.
"""

from __future__ import annotations

from absl import app, flags

from launch.cli import cli_main, parse_flags
from lmjax.data.pipeline import delimiters
from lmjax.data.prepare import PrepareConfig, prepare
from lmjax.data.tokenizer_io import load_tokenizer
from lmjax.errors import UserError

flags.DEFINE_multi_string("input", None, "files, directories or glob patterns (quote globs)")
flags.DEFINE_string("tokenizer", None, "SentencePiece model (from launch.train_tokenizer), or "
                    "a Hugging Face tokenizer.json or model directory")
flags.DEFINE_string("output", None, "token store directory to write or complete")
flags.DEFINE_enum("objective", "clm", ["clm", "mlm"],
                  "frames documents [bos]..[eos] (clm) or [CLS]..[SEP] (mlm)")
flags.DEFINE_integer("workers", 0, "worker processes or Ray tasks at once (0: every core)",
                     lower_bound=0)
flags.DEFINE_enum("engine", "local", ["local", "ray"], "process pool here, or Ray tasks")
flags.DEFINE_string("ray_address", "", "Ray cluster to join ('auto' on a started cluster); "
                    "empty starts Ray on this machine")
flags.DEFINE_string("text_field", "text", "JSON field / parquet column holding each document")
flags.DEFINE_enum("bad_utf8", "fail", ["fail", "skip"], "invalid UTF-8 lines: fail or skip")
flags.DEFINE_float("split_mb", 64, "uncompressed text and parquet are cut into shards of "
                     "about this many MiB of input")
flags.mark_flags_as_required(["input", "tokenizer", "output"])
FLAGS = flags.FLAGS


@cli_main
def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise UserError(f"unexpected arguments: {' '.join(argv[1:])} (give each file as --input)")
  if FLAGS.workers < 0:
    raise UserError(f"--workers must be >= 0, got {FLAGS.workers}")
  begin, end = delimiters(load_tokenizer(FLAGS.tokenizer), FLAGS.objective)
  summary = prepare(PrepareConfig(
      inputs=tuple(FLAGS.input), output=FLAGS.output, tokenizer=FLAGS.tokenizer, begin=begin,
      end=end, text_field=FLAGS.text_field, bad_utf8=FLAGS.bad_utf8, split_mb=FLAGS.split_mb,
      workers=FLAGS.workers, engine=FLAGS.engine, ray_address=FLAGS.ray_address))
  print(f"wrote {summary.path}: {summary.num_tokens:,} tokens, {summary.num_docs:,} documents "
        f"({summary.blank_docs:,} blank or null skipped), "
        f"{summary.shards} shards ({summary.reused} reused) in {summary.seconds:.1f}s, "
        f"{summary.tokens_per_s:,.0f} tokens/s; peak worker memory "
        f"{summary.peak_worker_rss_mb:,.0f} MiB")


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
