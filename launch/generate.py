"""Generates text from a decoder run or an imported Hugging Face model.

  python -m launch.generate --workdir runs/clm_tiny --prompt "ROMEO." \
      [--max_new_tokens 64 --temperature 0.8 --top_k 0 --top_p 0.95 --seed 0 --num_samples 1]
  python -m launch.generate --workdir runs/clm_tiny --interactive
  python -m launch.generate --workdir runs/chat_tiny --chat [--prompt "Who is there?"]

`--interactive` reads a line at a time, streams the reply as it is produced,
and keeps the whole conversation as context (the oldest tokens drop out once
it exceeds the model's length). `--chat` applies the model's chat template (the
run's, a Hugging Face directory's, or lmjax's default; `--chat_template FILE`
overrides it): each reply ends at the template's end-of-turn marker (or an eos id), and the
oldest turns drop out when the conversation outgrows the model. With `--prompt` it
answers that one user message and exits; without, it reads a turn per line.

A model's generation_config.json (a Hugging Face directory's, or the one a run fine-tuned
from it keeps) sets the defaults of --temperature, --top_p and --top_k (greedy unless it
says `do_sample`) and the ids that end a generation (often several); flags given win.
"""

from __future__ import annotations

import time

from absl import app, flags, logging

from launch.cli import (cli_main, define_adapter_flag, define_dtype_flag, load_flagged_model,
                        parse_flags)
from lmjax.errors import UserError

flags.DEFINE_string("workdir", None, "an lmjax run directory or a Hugging Face model directory")
flags.DEFINE_string("prompt", None, "text to continue")
flags.DEFINE_integer("max_new_tokens", 64, "tokens to generate per sample (or per reply)",
                     lower_bound=1)
flags.DEFINE_float("temperature", 0.8, "0 = greedy", lower_bound=0)
flags.DEFINE_integer("top_k", 0, "sample among the k most likely tokens (0 = all)", lower_bound=0)
flags.DEFINE_float("top_p", 0.95, "sample among the most likely tokens holding this mass")
flags.DEFINE_integer("seed", 0, "random seed for sampling", lower_bound=0)
flags.DEFINE_integer("num_samples", 1, "completions of the prompt", lower_bound=1)
flags.DEFINE_bool("interactive", False, "a prompt loop that streams replies")
flags.DEFINE_string("stop", "\n\n", "interactive: a reply ends at this text (empty: only EOS)")
flags.DEFINE_bool("chat", False, "converse through the model's chat template")
flags.DEFINE_string("system", "", "chat: a system message opening the conversation")
flags.DEFINE_string("chat_template", "", "chat: a .jinja template instead of the model's")
flags.mark_flags_as_required(["workdir"])
define_dtype_flag()
define_adapter_flag()
FLAGS = flags.FLAGS


@cli_main
def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  if FLAGS.prompt is None and not (FLAGS.interactive or FLAGS.chat):
    raise UserError("give --prompt TEXT, --interactive or --chat")
  if FLAGS.num_samples < 1:
    raise UserError("--num_samples must be >= 1")
  from lmjax.inference.generate import Generator
  source = load_flagged_model()
  sampling, eos_ids = sampling_config(source)
  if FLAGS.chat:
    chat_loop(source, sampling)
    return
  tok = source.tokenizer
  gen = Generator(source.model, source.params, eos=eos_ids, pad=max(tok.special.pad, 0))
  start = [tok.special.bos] if tok.special.bos >= 0 else []
  if FLAGS.interactive:
    converse(gen, tok, start, sampling)
    return
  prompt = start + tok.encode([FLAGS.prompt])[0]
  began = time.perf_counter()
  outputs = gen.generate([prompt] * FLAGS.num_samples, sampling, FLAGS.seed)
  seconds = time.perf_counter() - began
  for i, ids in enumerate(outputs):
    if FLAGS.num_samples > 1:
      print(f"--- sample {i + 1}")
    print(FLAGS.prompt + tok.decode(ids))
  logging.info("%d tokens in %.2fs (with compilation)", sum(map(len, outputs)), seconds)


def sampling_config(source) -> tuple:
  """(SamplingConfig, eos ids): the sampling flags given, else the model's
  generation_config.json's defaults where it has one, else the flags' defaults."""
  from lmjax.inference import generation_config
  from lmjax.inference.generate import SamplingConfig
  defaults = generation_config.for_model(source)
  knobs = {k: FLAGS[k].value for k in ("temperature", "top_k", "top_p")}
  if defaults.source:
    logging.info("sampling defaults from %s", defaults.describe())
    knobs.update({k: getattr(defaults, k) for k in knobs if not FLAGS[k].present})
  return SamplingConfig(FLAGS.max_new_tokens, **knobs), defaults.eos_ids


def chat_loop(source, sampling) -> None:
  """--chat: one reply to --prompt, or a turn per line of stdin, each reply streamed."""
  from lmjax.inference.chat import ChatSession
  session = ChatSession(source, FLAGS.chat_template)
  messages = [{"role": "system", "content": FLAGS.system}] if FLAGS.system else []
  turn = 0
  while True:
    if FLAGS.prompt is not None:
      line = FLAGS.prompt
    else:
      try:
        line = input("> ")
      except EOFError:
        print()
        return
    messages.append({"role": "user", "content": line})
    reply: list[int] = []
    shown = ""
    for token in session.reply(messages, sampling, FLAGS.seed + turn):
      reply.append(token)
      text = session.tokenizer.decode(reply)
      print(text[len(shown):], end="", flush=True)
      shown = text
    print(flush=True)
    messages.append({"role": "assistant", "content": session.tokenizer.decode(reply)})
    turn += 1
    if FLAGS.prompt is not None:
      return


def converse(gen, tok, history: list[int], sampling) -> None:
  """Prompt loop: each reply streams; the conversation so far is the next prompt."""
  turn = 0
  while True:
    try:
      line = input("> ")
    except EOFError:
      print()
      return
    history = history + tok.encode([line + "\n"])[0]
    reply: list[int] = []
    shown = ""
    for token in gen.stream(history, sampling, FLAGS.seed + turn):
      reply.append(token)
      text = tok.decode(reply)
      print(text[len(shown):], end="", flush=True)
      shown = text
      if FLAGS.stop and FLAGS.stop in text:
        break
    print(flush=True)
    history += reply
    turn += 1


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
