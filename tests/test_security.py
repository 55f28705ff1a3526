"""Nothing in the package, launchers or benchmarks may unpickle (weights and data travel as
safetensors, npy with allow_pickle off, and JSON); a run writes only inside its workdir
(and the caches it is told to use) and reads only numeric step directories."""

import os
import pathlib
import re

from lmjax import train as train_lib
from lmjax.experiment import experiment_from_dict
from tiny import ROOT, tiny_config

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


def _files(folder):
  return {os.path.join(d, f) for d, _, files in os.walk(folder) for f in files}


def test_a_run_writes_only_inside_its_workdir_and_caches(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  config = tiny_config("clm_tiny", tmp_path, train__steps=2, train__checkpoint_every=2)
  before = _files(tmp_path)
  train_lib.train_and_evaluate(experiment_from_dict(config.to_dict()), "run")
  written = _files(tmp_path) - before
  outside = [p for p in written if not p.startswith((str(tmp_path / "run") + os.sep,
                                                     str(tmp_path / "cache") + os.sep))]
  assert written and not outside, outside


def test_linked_step_directories_are_never_read(tmp_path):
  """A step directory that is a link (to another run, or anywhere) is moved aside; its
  target is neither read nor touched."""
  config = tiny_config("clm_tiny", tmp_path, train__steps=2, train__checkpoint_every=2)
  exp = experiment_from_dict(config.to_dict())
  train_lib.train_and_evaluate(exp, str(tmp_path / "other"))
  os.makedirs(tmp_path / "run" / "checkpoints")
  os.symlink(tmp_path / "other" / "checkpoints" / "2", tmp_path / "run" / "checkpoints" / "2")
  before = _files(tmp_path / "other")
  train_lib.train_and_evaluate(exp, str(tmp_path / "run"))
  assert sorted(os.listdir(tmp_path / "run" / "checkpoints")) == ["2"]
  assert not os.path.islink(tmp_path / "run" / "checkpoints" / "2")  # trained afresh
  aside = os.listdir(tmp_path / "run" / "checkpoints_damaged")
  assert len(aside) == 1 and aside[0].startswith("2.")
  assert _files(tmp_path / "other") == before
