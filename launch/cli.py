"""Conventions every launcher shares: one-line errors and a readable log."""

from __future__ import annotations

import functools
import logging as py_logging
import sys
from typing import Callable

from absl import flags, logging

from lmjax.errors import UserError

# Libraries whose INFO lines drown the training log; their warnings still show.
_QUIET = ("orbax", "tensorstore", "jax/_src", "etils")


class _QuietLibraries(py_logging.Filter):
  def filter(self, record: py_logging.LogRecord) -> bool:
    noisy = record.levelno < py_logging.WARNING and any(n in record.pathname for n in _QUIET)
    return not noisy


def cli_main(main: Callable[[list[str]], None]) -> Callable[[list[str]], None]:
  """Wraps an absl main: quiets library INFO logs; a `UserError` becomes one line on
  stderr and exit status 2."""
  @functools.wraps(main)
  def wrapped(argv: list[str]) -> None:
    logging.get_absl_handler().addFilter(_QuietLibraries())
    try:
      main(argv)
    except UserError as e:
      _fail(str(e))
  return wrapped


def parse_flags(argv: list[str]) -> list[str]:
  """absl flag parsing where a bad flag or `--config.KEY=VALUE` is one line, exit status 2.

  config_flags raises KeyError/AttributeError for an override of a key that does
  not exist; the message then names the override's full path.
  """
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    _fail(str(e))
  except (KeyError, AttributeError) as e:
    key = str(e).strip("\"'")
    bad = [a.split("=")[0] for a in argv if a.startswith("--config.") and
           key in a.split("=")[0].split(".")]
    _fail(f"{bad[0] if bad else key}: no such config key (see the experiment file "
          "and lmjax/experiment.py for the fields)")
  return []  # unreachable


def _fail(message: str) -> None:
  print(f"error: {message}", file=sys.stderr)
  sys.exit(2)
