"""Trains a SentencePiece tokenizer with lmjax's special tokens.

  python -m launch.train_tokenizer --input corpus.txt [--input more.jsonl] \
      --output tokenizer.model --vocab_size 8192 --model_type unigram [--chat_markers]

`--chat_markers` reserves lmjax's chat role markers (<|system|>, <|user|>,
<|assistant|>, the default chat template's) as atomic pieces; `--symbols` adds
pieces of your own (a template's markers), comma-separated.
"""

from __future__ import annotations

from absl import app, flags

from launch.cli import cli_main, parse_flags
from lmjax.data.chat import ROLE_MARKERS
from lmjax.data.readers import expand_inputs, read_documents
from lmjax.data.tokenizer import train_tokenizer

flags.DEFINE_multi_string("input", None, "files, directories or globs to learn the vocabulary "
                          "from (.txt, .jsonl, .jsonl.gz, .jsonl.zst, .parquet)")
flags.DEFINE_string("text_field", "text", "JSON field / parquet column holding the text")
flags.DEFINE_string("output", None, "path of the SentencePiece model to write")
flags.DEFINE_integer("vocab_size", 8192, "number of pieces, special and byte pieces included",
                     lower_bound=1)
flags.DEFINE_enum("model_type", "unigram", ["unigram", "bpe"], "SentencePiece algorithm")
flags.DEFINE_integer("max_sentences", 2_000_000, "lines sampled for training", lower_bound=1)
flags.DEFINE_float("character_coverage", 1.0, "share of characters the vocabulary covers; "
                   "rarer ones become byte pieces (0.9995 is usual for CJK text)")
flags.DEFINE_bool("chat_markers", False, "reserve the default chat template's role markers "
                  "as single pieces")
flags.DEFINE_list("symbols", [], "more pieces kept whole (e.g. a chat template's markers)")
flags.mark_flags_as_required(["input", "output"])
FLAGS = flags.FLAGS


def lines(paths, text_field="text"):
  for path in paths:
    for doc in read_documents(path, text_field=text_field):
      yield from doc.split("\n")


@cli_main
def main(argv: list[str]) -> None:
  del argv
  files = expand_inputs(FLAGS.input)
  symbols = (list(ROLE_MARKERS) if FLAGS.chat_markers else []) + FLAGS.symbols
  tok = train_tokenizer(lines(files, FLAGS.text_field), FLAGS.output, FLAGS.vocab_size,
                        FLAGS.model_type, FLAGS.max_sentences,
                        character_coverage=FLAGS.character_coverage, extra_symbols=symbols)
  print(f"wrote {FLAGS.output}: {tok.vocab_size} pieces, sha256 {tok.sha256}")


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
