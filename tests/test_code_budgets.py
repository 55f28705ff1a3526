"""The size budget of the developer guide, held: no function in the library or the
launchers is longer than 60 lines (the training loop included)."""

from __future__ import annotations

import ast
import os

from tiny import ROOT

LIMIT = 60


def _functions(folder):
  for d, _, files in os.walk(os.path.join(ROOT, folder)):
    for name in files:
      if name.endswith(".py"):
        path = os.path.join(d, name)
        with open(path) as f:
          tree = ast.parse(f.read())
        for node in ast.walk(tree):
          if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            yield os.path.relpath(path, ROOT), node


def test_no_function_is_longer_than_60_lines():
  long = sorted((n.end_lineno - n.lineno + 1, f"{p}:{n.lineno} {n.name}")
                for folder in ("lmjax", "launch") for p, n in _functions(folder)
                if n.end_lineno - n.lineno + 1 > LIMIT)
  assert not long, long
