"""The one loader of the Python files a sweep runs from: the sweep file (`get_sweep()`)
and the experiment file (`get_config([ARG])`) whose keys a search overrides."""

from __future__ import annotations

import importlib.util
import os
from typing import Any

from lmjax.errors import UserError


def call_in_file(path: str, function: str, *args: Any, what: str = "file") -> Any:
  """Runs the Python file at `path` and returns `function(*args)` from it."""
  if not os.path.isfile(path):
    raise UserError(f"{what} not found: {path}")
  spec = importlib.util.spec_from_file_location(f"lmjax_{what.replace(' ', '_')}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  if not hasattr(module, function):
    raise UserError(f"{path} must define {function}()")
  return getattr(module, function)(*args)


def load_sweep(path: str) -> Any:
  """The sweep file's `get_sweep()`: a `Sweep` (grid, random) or a `Search` (Optuna)."""
  from lmjax.sweep.grid import Sweep
  from lmjax.sweep.search import Search
  spec = call_in_file(path, "get_sweep", what="sweep file")
  if not isinstance(spec, (Sweep, Search)):
    raise UserError(f"{path}: get_sweep() must return lmjax.sweep.Sweep or "
                    f"lmjax.sweep.Search, not {type(spec).__name__}")
  return spec


def load_experiment_config(path: str) -> Any:
  """The experiment file's ConfigDict; `path` may end in `:ARG` as launch.train's does."""
  file, _, arg = path.partition(":")
  return call_in_file(file, "get_config", *([arg] if arg else []), what="experiment file")
