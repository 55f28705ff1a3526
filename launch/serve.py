"""Serves a decoder run or a Hugging Face model over the OpenAI HTTP API.

  python -m launch.serve --workdir runs/chat_tiny [--host 127.0.0.1] [--port 8000] \
      [--api_key KEY] [--max_batch 8] [--max_len L] [--prefill_chunk 64] [--name NAME]

Endpoints: POST /v1/chat/completions, POST /v1/completions, GET /v1/models, GET
/health (see lmjax/inference/server.py and docs/serve.md). Requests share the
running batch of up to `--max_batch` rows (continuous batching); the programs that serve
them (a prefill per width 16, 32, ... --prefill_chunk; a decode program of up to 8 steps,
a row insert and the copies to the next size per cache size 1, 2, 4, ... max_batch)
compile at start-up. It listens on 127.0.0.1 unless --host says
otherwise; with --api_key (or the LMJAX_API_KEY environment variable) every
request must carry `Authorization: Bearer KEY`. A model's generation_config.json gives the
defaults of the sampling fields a request leaves out (temperature, top_p, top_k) and the
ids that end a reply (several, often). SIGTERM or Ctrl-C stops taking
requests, lets the running ones finish (up to --drain_seconds, then cancels them)
and exits 0.
"""

from __future__ import annotations

import os
import signal
import time

from absl import app, flags, logging

from launch.cli import (cli_main, define_adapter_flag, define_dtype_flag, load_flagged_model,
                        parse_flags)
from lmjax.errors import UserError

flags.DEFINE_string("workdir", None, "an lmjax decoder run or a Hugging Face model directory")
flags.DEFINE_string("host", "127.0.0.1", "address to listen on (0.0.0.0: every interface)")
flags.DEFINE_integer("port", 8000, "TCP port (0: any free port, printed at start)",
                     lower_bound=0, upper_bound=65535)
flags.DEFINE_string("api_key", None, "require `Authorization: Bearer KEY` "
                    "(default: $LMJAX_API_KEY if set, else no key)")
flags.DEFINE_integer("max_batch", 8, "rows of the running batch: requests decoded together",
                     lower_bound=1)
flags.DEFINE_integer("max_len", None, "longest prompt + reply in tokens (default: the model's)",
                     lower_bound=2)
flags.DEFINE_integer("prefill_chunk", 64, "prompt tokens prefilled per step: a long prompt "
                     "delays the running requests by one chunk per token at most", lower_bound=1)
flags.DEFINE_string("name", None, "the model name clients use (default: the directory's name)")
flags.DEFINE_string("chat_template", "", "a .jinja chat template instead of the model's")
flags.DEFINE_float("drain_seconds", 30.0, "on SIGTERM, how long running requests may finish",
                   lower_bound=0)
flags.mark_flags_as_required(["workdir"])
define_dtype_flag()
define_adapter_flag()
FLAGS = flags.FLAGS


@cli_main
def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  try:
    import uvicorn
    from lmjax.inference import server
  except ImportError:
    raise UserError('launch.serve needs FastAPI and uvicorn: pip install -e ".[serve]"') from None
  from lmjax.data.chat import load_template
  from lmjax.inference import generation_config
  from lmjax.inference.engine import Engine
  api_key = FLAGS.api_key if FLAGS.api_key is not None else os.environ.get("LMJAX_API_KEY")
  if api_key == "":
    raise UserError("--api_key is empty; give a key or leave the flag out")
  _check_port(FLAGS.host, FLAGS.port)
  source = load_flagged_model()
  tokenizer = source.tokenizer
  engine = Engine(source.model, source.params, pad=max(tokenizer.special.pad, 0),
                  slots=FLAGS.max_batch, chunk=FLAGS.prefill_chunk, max_len=FLAGS.max_len)
  name = FLAGS.name or os.path.basename(os.path.normpath(FLAGS.workdir))
  generation = generation_config.for_model(source)
  if generation.source:
    logging.info("request defaults from %s", generation.describe())
  served = server.Served(engine, tokenizer, load_template(tokenizer, FLAGS.chat_template), name,
                         int(time.time()), generation=generation)
  began = time.perf_counter()
  engine.start()
  logging.info("compiled in %.1fs: %d rows x %d tokens, prefill chunks of %d; KV cache %.1f MiB "
               "(%.2f MiB a row)", time.perf_counter() - began, engine.slots, engine.max_len,
               engine.chunk, engine.cache_bytes() / 2 ** 20,
               engine.cache_bytes() / engine.slots / 2 ** 20)
  config = uvicorn.Config(server.create_app(served, api_key), host=FLAGS.host, port=FLAGS.port,
                          log_level="warning", timeout_graceful_shutdown=FLAGS.drain_seconds)
  try:
    _Server(config).run()
  finally:
    engine.stop()


def _check_port(host: str, port: int) -> None:
  """Fails in one line before the model loads if the address cannot be bound (uvicorn would
  find out after start-up and compilation)."""
  import socket
  try:
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
  except socket.gaierror as e:
    raise UserError(f"--host {host}: {e.strerror}") from None
  family, kind, proto, _, address = infos[0]
  with socket.socket(family, kind, proto) as sock:
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
    try:
      sock.bind(address)
    except OSError as e:
      raise UserError(f"cannot listen on {host}:{port}: {e.strerror}; pick another --port "
                      "(0: any free one)") from None


class _Server:
  """uvicorn's server, printing where it listens, and exiting 0 after SIGTERM/SIGINT (uvicorn
  re-raises the signal once it has drained, which would end the process by that signal)."""

  def __new__(cls, config):
    import uvicorn

    class Server(uvicorn.Server):
      def handle_exit(self, sig, frame):
        super().handle_exit(sig, frame)
        if sig in (signal.SIGTERM, signal.SIGINT) and sig in self._captured_signals:
          self._captured_signals.remove(sig)

      async def startup(self, sockets=None):
        await super().startup(sockets)
        if self.started:
          for s in self.servers:
            for sock in s.sockets:
              host, port = sock.getsockname()[:2]
              print(f"serving {FLAGS.name or FLAGS.workdir} on http://{host}:{port}/v1",
                    flush=True)
    return Server(config)


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
