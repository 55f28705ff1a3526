"""Nothing in the package, launchers or benchmarks may unpickle: weights and data travel as
safetensors, npy (allow_pickle off) and JSON only."""

import pathlib
import re

from tiny import ROOT

FORBIDDEN = re.compile(r"\b(import pickle|from pickle|cPickle|dill|cloudpickle|torch\.load|"
                       r"allow_pickle\s*=\s*True|pickle\.loads?)\b")


def test_no_pickle_anywhere():
  offenders = []
  for folder in ("lmjax", "launch", "benchmarks", "experiments"):
    for path in pathlib.Path(ROOT, folder).rglob("*.py"):
      for lineno, line in enumerate(path.read_text().splitlines(), 1):
        if FORBIDDEN.search(line):
          offenders.append(f"{path}:{lineno}: {line.strip()}")
  assert not offenders, "\n".join(offenders)
  assert FORBIDDEN.search("x = pickle.loads(blob)")  # the pattern itself works
