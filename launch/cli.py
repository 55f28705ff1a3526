"""Conventions every launcher shares: one-line errors, a readable log, and where an
`--output` file goes (`output_path`)."""

from __future__ import annotations

import functools
import json
import logging as py_logging
import os
import re
import sys
import threading
from typing import Any, Callable

from absl import flags, logging

from lmjax import paths
from lmjax.errors import CheckpointSaveError, UserError

# Libraries whose INFO lines drown the training log; their warnings still show.
_QUIET = ("orbax", "tensorstore", "jax/_src", "etils")
# Library warnings that describe what lmjax asked for (reading another run's checkpoints).
_EXPECTED = ("Given directory is read only", "CheckpointManagerOptions.read_only=True")


class _QuietLibraries(py_logging.Filter):
  """Drops library INFO lines; library errors keep their first line, not their traceback
  (the failure they report reaches the user as one `error:` line anyway)."""

  def filter(self, record: py_logging.LogRecord) -> bool:
    if not any(n in record.pathname for n in _QUIET):
      return True
    if record.levelno == py_logging.WARNING and str(record.msg).startswith(_EXPECTED):
      return False
    if record.levelno >= py_logging.ERROR:
      record.msg, record.args = record.getMessage().splitlines()[0][:300], None
      record.exc_info = record.exc_text = None
    return record.levelno >= py_logging.WARNING


def _thread_exception(args: threading.ExceptHookArgs) -> None:
  """A library's worker thread that dies logs one line instead of a traceback."""
  where = args.thread.name if args.thread else "a thread"
  logging.warning("%s stopped: %s: %s", where, args.exc_type.__name__,
                  str(args.exc_value).splitlines()[0][:300] if str(args.exc_value) else "")


_seen_unraisable: set[str] = set()


def _unraisable(args) -> None:
  """Callbacks that fire after their event loop closed (orbax after a failed write):
  one line per distinct message."""
  line = f"{args.exc_type.__name__}: {str(args.exc_value)[:300]}"
  if line not in _seen_unraisable:
    _seen_unraisable.add(line)
    logging.warning("ignored %s", line)


def cli_main(main: Callable[[list[str]], None]) -> Callable[[list[str]], None]:
  """Wraps an absl main: quiets library INFO logs; a `UserError` becomes one line on
  stderr and exit status 2."""
  @functools.wraps(main)
  def wrapped(argv: list[str]) -> None:
    logging.get_absl_handler().addFilter(_QuietLibraries())
    threading.excepthook = _thread_exception
    sys.unraisablehook = _unraisable
    try:
      main(argv)
    except CheckpointSaveError as e:
      # Orbax's background writers are still unwinding; their shutdown noise would bury
      # the one line, and there is nothing left to flush.
      print(f"error: {e}", file=sys.stderr, flush=True)
      logging.flush()
      os._exit(2)
    except UserError as e:
      _fail(str(e))
  return wrapped


def parse_flags(argv: list[str]) -> list[str]:
  """absl flag parsing where a bad flag or `--config.KEY=VALUE` is one line, exit status 2.

  config_flags raises KeyError/AttributeError for an override of a key that does
  not exist; the message then names the override's full path.
  """
  try:
    rest = flags.FLAGS(argv)
    config = flags.FLAGS["config"] if "config" in flags.FLAGS else None
    if config is not None and config.present and not isinstance(config.value, str):
      flags.FLAGS.config.to_dict()  # config_flags defers a file's load error to first use
    return rest
  except flags.Error as e:
    _fail(_last_line(str(e)))
  except OSError as e:  # --config names a file that cannot be read
    _fail(f"--config: {str(e).splitlines()[-1].strip()}")
  except (KeyError, AttributeError) as e:
    # ml_collections: 'key', or 'key' then Did you mean "other" instead of "key"? (escaped)
    text = str(e.args[0] if e.args else e)
    found = re.search(r"'([^'\\]+)", text)
    key = found.group(1) if found else text.strip("\"'")
    bad = [a.split("=")[0] for a in argv if a.startswith("--config.") and
           key in a.split("=")[0].split(".")]
    near = re.search(r'Did you mean "([^"]+)"', text)
    hint = f'; did you mean "{near.group(1)}"?' if near else ""
    _fail(f"{bad[0] if bad else key}: no such config key{hint} (see the experiment file "
          "and lmjax/experiment.py for the fields)")
  return []  # unreachable


def define_dtype_flag() -> None:
  """`--dtype` for the launchers that compute with a loaded model."""
  from lmjax.model.config import DTYPES
  flags.DEFINE_enum("dtype", None, ("auto",) + DTYPES,
                    "compute dtype (default: what the model declares: a Hugging Face "
                    "checkpoint's dtype, float32 when absent; an lmjax run's model.dtype)")


def define_adapter_flag() -> None:
  """`--adapter` for the launchers that load a model: a PEFT LoRA adapter merged at load."""
  flags.DEFINE_string("adapter", "", "a PEFT LoRA adapter directory (adapter_config.json, "
                      "adapter_model.safetensors) merged into --workdir's weights at load")


def load_flagged_model() -> Any:
  """The model of `--workdir` (an lmjax run or a Hugging Face directory) in `--dtype`, with
  `--adapter` merged when given: what the launchers that compute with a loaded model read."""
  from lmjax import pretrained
  flag = flags.FLAGS
  return pretrained.load(flag.workdir, flag.dtype, announce=True, adapter=flag.adapter)


def output_path(workdir: str, name: str) -> str:
  """Where `--output=name` writes: a bare file name inside `workdir` for an lmjax run, and
  in the current directory for a Hugging Face model directory (never into the model's own
  folder, often read-only or shared); any other path (relative to the current directory,
  absolute, gs:// or s3://) as given. Its directory is created and checked writable here,
  so a bad one is one line before the evaluation runs, not after it."""
  from lmjax.pretrained import is_hf_dir
  if not name or name in (".", "..") or name.endswith(("/", os.sep)):
    raise UserError(f"--output={name!r} must name a file")
  bare = not paths.is_remote(name) and os.path.basename(name) == name
  if bare and not is_hf_dir(workdir):
    if not paths.isdir(workdir):
      return paths.join(workdir, name)  # loading the model refuses the workdir next
    path = paths.join(paths.resolve(workdir), name)
  else:
    path = paths.resolve(name)
  _check_writable(path, name)
  return path


def _check_writable(path: str, name: str) -> None:
  """Creates `path`'s directory and writes and removes a probe file there (a bucket:
  lists it and puts and deletes a probe object)."""
  folder, remote = paths.dirname(path), paths.is_remote(path)
  if remote:
    paths.check_access(folder, write=True)  # a bad bucket or credentials: one line
  if paths.isdir(path):
    raise UserError(f"--output={name}: {path} is a directory; name a file")
  if remote:
    return
  probe = os.path.join(folder, f".{os.path.basename(path)}.{paths.tmp_tag()}")
  try:
    os.makedirs(folder, exist_ok=True)
    with open(probe, "wb"):
      pass
    os.remove(probe)
  except OSError as e:
    raise UserError(f"--output={name}: cannot write in {folder} ({e.strerror or e})") from None


def write_json(path: str, data: Any, default: Callable | None = None) -> None:
  """Writes `data` as indented JSON, atomically (a reader never sees half a file)."""
  paths.write_atomic(path, json.dumps(data, indent=2, default=default))


def _last_line(text: str) -> str:
  """A config file's error arrives with its traceback: keep the first line and the error."""
  lines = [line for line in text.splitlines() if line.strip()]
  if len(lines) <= 1:
    return text
  return f"{lines[0].rstrip(':')}: {lines[-1].strip()}"


def _fail(message: str) -> None:
  print(f"error: {message}", file=sys.stderr)
  sys.exit(2)
