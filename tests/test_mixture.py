"""Weighted data mixtures: realised shares, stages, purity in (seed, step), any host count,
wraps and stops, per-source evaluation in metrics.jsonl and TensorBoard, exact resume."""

import glob
import importlib.util
import json
import os
import struct

import numpy as np
import pytest

from test_optimizers import StopAt
from tiny import ROOT, assert_same_checkpoint, tiny_config
from lmjax import train as train_lib
from lmjax.data.batches import PackedDataset
from lmjax.data.mixture import InterleavedEval, MixtureDataset, parse_mixture, stage_weights
from lmjax.data.store import TokenStream
from lmjax.errors import UserError
from lmjax.experiment import experiment_from_dict

SEQ = 8


def _mixture(weights, windows=(5000, 3000, 4000), seed=0, stages=None, exhausted="wrap"):
  """Synthetic sources: every token of window k of source j is j * 100000 + k, so a row says
  its source and its window."""
  spec = {f"s{j}": {"train_files": ("x",), "weight": w, "stages": (stages or {}).get(j, ())}
          for j, w in enumerate(weights)}
  sources = parse_mixture(spec)
  data = [PackedDataset(TokenStream((j * 100000 + np.arange(n * SEQ) // SEQ).astype(np.int32),
                                    np.arange(0, n * SEQ, 50)), SEQ, seed, salt=(7, j))
          for j, n in enumerate(windows)]
  return MixtureDataset([s.name for s in sources], data, stage_weights(sources), seed, exhausted)


def _sources_of(batch):
  return batch["tokens"][:, 0] // 100000


def test_realised_shares_are_within_one_percent_over_10000_windows():
  data = _mixture([0.5, 0.3, 0.2])
  rows = np.concatenate([_sources_of(data.batch(step, 40)) for step in range(250)])  # 10,000
  share = np.bincount(rows, minlength=3) / len(rows)
  np.testing.assert_allclose(share, [0.5, 0.3, 0.2], atol=0.01)
  np.testing.assert_array_equal(np.bincount(rows, minlength=3), data.consumed(250, 40))
  # a source's rows are windows of its own shuffled epoch, none repeated before it wraps
  tokens = np.concatenate([data.batch(s, 40)["tokens"] for s in range(250)])
  windows = tokens[_sources_of({"tokens": tokens}) == 2][:, 0] % 100000
  assert len(windows) == len(np.unique(windows)) > 1900  # of its 4,000 windows
  assert (np.diff(windows[:50]) != 1).any()  # in a shuffled order


def test_stages_change_the_weights_from_their_step():
  data = _mixture([0.5, 0.5, 0.0], stages={0: ((100, 0.1),), 2: ((100, 0.4),)})
  before = np.concatenate([_sources_of(data.batch(s, 40)) for s in range(100)])
  after = np.concatenate([_sources_of(data.batch(s, 40)) for s in range(100, 350)])
  np.testing.assert_allclose(np.bincount(before, minlength=3) / len(before), [0.5, 0.5, 0],
                             atol=0.01)
  np.testing.assert_allclose(np.bincount(after, minlength=3) / len(after), [0.1, 0.5, 0.4],
                             atol=0.01)
  np.testing.assert_array_equal(np.bincount(np.concatenate([before, after]), minlength=3),
                                data.consumed(350, 40))


def test_every_batch_is_a_function_of_seed_and_step_on_any_host_count():
  a, b, other = _mixture([0.6, 0.4]), _mixture([0.6, 0.4]), _mixture([0.6, 0.4], seed=1)
  for step in (0, 7, 123):
    whole = a.batch(step, 16)
    for n in (1, 2, 4, 8):
      parts = [b.batch(step, 16, i, n) for i in range(n)]
      for key in whole:
        np.testing.assert_array_equal(np.concatenate([p[key] for p in parts]), whole[key])
    assert not np.array_equal(whole["tokens"], other.batch(step, 16)["tokens"])


def test_the_overall_eval_set_takes_the_sources_in_turn():
  a, b = (PackedDataset(TokenStream((j * 100000 + np.arange(n * SEQ) // SEQ).astype(np.int32),
                                    np.arange(0, n * SEQ, 50)), SEQ, 0, shuffle=False)
          for j, n in ((3, 5), (4, 2)))
  data = InterleavedEval([a, b])
  assert data.num_eval_batches(4) == 2
  rows = np.concatenate([data.eval_batch(i, 4, p, 2)["tokens"][:, 0] for i in range(2)
                         for p in range(2)])
  np.testing.assert_array_equal(rows, [300000, 400000, 300001, 400001, 300002, 300003, 300004,
                                       0])  # in turn; the last row is padding


def test_a_source_wraps_into_a_new_epoch():
  data = _mixture([0.5, 0.5], windows=(64, 4000))
  used = data.consumed(128, 16)  # one block of 2,048 rows: 1,024 each, exactly
  assert used[0] == 1024
  rows = np.concatenate([data.batch(s, 16)["tokens"] for s in range(128)])
  mine = rows[_sources_of({"tokens": rows}) == 0][:, 0] % 100000
  assert (np.bincount(mine) == 16).all() and len(np.bincount(mine)) == 64  # 16 passes
  assert not np.array_equal(mine[:64], mine[64:128])  # each pass in its own order


@pytest.mark.parametrize("spec,message", [
    ({"a": {"train_files": (), "weight": 1.0}}, "data.mixture.a.train_files is empty"),
    ({"a": {"train_files": ("x",), "weight": -1.0}}, "weights must be numbers >= 0"),
    ({"a": {"train_files": ("x",), "wieght": 1.0}}, "unknown key.*wieght"),
    ({"a": {"train_files": ("x",), "weight": 1.0, "stages": ((5, 0.0),)}},
     "every weight is 0 from step 5"),
    ({"a": {"train_files": ("x",), "stages": ((5, 1.0), (2, 1.0))}}, "in step order"),
])
def test_bad_mixtures_are_one_line(tmp_path, spec, message):
  config = tiny_config("clm_tiny", tmp_path)
  config.data.train_files, config.data.mixture = (), spec
  with pytest.raises(UserError, match=message):
    experiment_from_dict(config.to_dict())


def test_mixture_and_train_files_are_exclusive(tmp_path):
  config = tiny_config("clm_mixture", tmp_path)
  config.data.train_files = config.data.eval_files = ("a.txt",)
  with pytest.raises(UserError, match="data.mixture and data.train_files both set"):
    experiment_from_dict(config.to_dict())


def _tensorboard_tags(workdir):
  tags = set()
  for path in glob.glob(os.path.join(workdir, "tensorboard", "events*")):
    from tensorboardX.proto import event_pb2
    data, at = open(path, "rb").read(), 0
    while at < len(data):  # TFRecord: length, its crc, the Event, its crc
      (size,) = struct.unpack("<Q", data[at:at + 8])
      tags |= {v.tag for v in event_pb2.Event.FromString(data[at + 12:at + 12 + size])
               .summary.value}
      at += 16 + size
  return tags


def _mixture_run(tmp_path, sources=None, **overrides):
  """clm_mixture, tiny, its history rising from step 6 (and `sources`: {name: changes})."""
  config = tiny_config("clm_mixture", tmp_path, **{"train__eval_every": 5, **overrides})
  for name in config.data.mixture:
    config.data.mixture[name].stages = ((6, 0.4),) if name == "history" else ()
    config.data.mixture[name].update((sources or {}).get(name, {}))
  return experiment_from_dict(config.to_dict())


def test_training_on_a_mixture_reports_each_source(tmp_path):
  exp = _mixture_run(tmp_path, train__steps=10)
  train_lib.train_and_evaluate(exp, str(tmp_path / "run"))
  records = [json.loads(x) for x in open(tmp_path / "run" / "metrics.jsonl")]
  splits = {r["split"] for r in records}
  assert {"eval", "eval/comedy", "eval/tragedy", "eval/history", "data"} <= splits, splits
  per_source = [r for r in records if r["split"] == "eval/tragedy"]
  assert [r["step"] for r in per_source] == [5, 10] and per_source[0]["loss"] > 0
  usage = [r for r in records if r["split"] == "data"][-1]
  assert abs(sum(usage[f"{n}/share"] for n in ("comedy", "tragedy", "history")) - 1) < 1e-9
  # the overall held-out loss takes the sources in turn: its prefix is not one source's
  overall = [r["loss"] for r in records if r["split"] == "eval"][-1]
  assert overall not in {r["loss"] for r in records if r["split"].startswith("eval/")}
  tags = _tensorboard_tags(tmp_path / "run")
  assert {"eval/comedy/loss", "eval/history/loss", "data/history/wraps"} <= tags, tags
  # exact resume: stopped at step 5 and resumed, the run ends where the straight one did
  part = tmp_path / "part"
  train_lib.train_and_evaluate(exp, str(part), hooks=[StopAt(5)])
  train_lib.train_and_evaluate(exp, str(part))
  assert_same_checkpoint(tmp_path / "run", part, 10)


def test_a_source_that_runs_out_stops_the_run_with_a_checkpoint(tmp_path):
  """`mixture_exhausted=stop`: the run saves and ends before the first batch that would
  reread a source; started again, it says so in one line. The sources are the first 40 kB
  of each genre's plays, so one runs out within a few dozen steps."""
  from experiments.clm_mixture import GENRES
  sources = {}
  for name in ("comedy", "tragedy", "history"):
    with open(os.path.join(GENRES, f"{name}_train.txt")) as f:
      text = f.read(40000)
    (tmp_path / f"{name}.txt").write_text(text[:text.rindex("\n") + 1])
    sources[name] = {"train_files": (str(tmp_path / f"{name}.txt"),)}
  exp = _mixture_run(tmp_path, train__steps=400, train__batch_size=64,
                     data__mixture_exhausted="stop", train__eval_every=0,
                     train__checkpoint_every=1000, sources=sources)
  train_lib.train_and_evaluate(exp, str(tmp_path / "run"))
  records = [json.loads(x) for x in open(tmp_path / "run" / "metrics.jsonl")]
  last = max(r["step"] for r in records)
  assert 0 < last < 400
  usage = [r for r in records if r["split"] == "data"][-1]
  assert max(usage[f"{n}/epochs"] for n in ("comedy", "tragedy", "history")) <= 1.0
  assert all(usage[f"{n}/wraps"] == 0 for n in ("comedy", "tragedy", "history"))
  with pytest.raises(UserError, match="would be read past their end"):
    train_lib.train_and_evaluate(exp, str(tmp_path / "run"))


def test_genre_corpora_are_what_their_script_writes(tmp_path):
  spec = importlib.util.spec_from_file_location(
      "make_genre_corpora", os.path.join(ROOT, "experiments", "data", "make_genre_corpora.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  module.main(str(tmp_path))
  shipped = os.path.join(ROOT, "experiments", "data", "genres")
  assert sorted(os.listdir(tmp_path)) == sorted(os.listdir(shipped))
  for name in os.listdir(shipped):
    assert (tmp_path / name).read_bytes() == open(os.path.join(shipped, name), "rb").read()
