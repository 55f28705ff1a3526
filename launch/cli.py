"""Conventions every launcher shares: one-line errors and a readable log."""

from __future__ import annotations

import functools
import logging as py_logging
import sys
from typing import Callable

from absl import logging

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
      print(f"error: {e}", file=sys.stderr)
      sys.exit(2)
  return wrapped
