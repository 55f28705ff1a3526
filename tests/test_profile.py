"""train.profile_steps: a jax.profiler trace of exactly those steps, where TensorBoard's profile
plugin looks for it."""

import glob

import jax
import pytest

from tiny import tiny_config
from lmjax import train as train_lib
from lmjax.errors import UserError
from lmjax.experiment import experiment_from_dict


def _traced_steps(path: str) -> set[int]:
  steps = set()
  for plane in jax.profiler.ProfileData.from_file(path).planes:
    for line in plane.lines:
      for event in line.events:
        if event.name == "train":  # the StepTraceAnnotation around each train step
          steps.add(int(dict(event.stats)["step_num"]))
  return steps


def test_profile_steps_trace_covers_those_steps(tmp_path):
  config = tiny_config("clm_tiny", tmp_path, train__steps=5, train__profile_steps=(2, 3))
  train_lib.train_and_evaluate(experiment_from_dict(config.to_dict()), str(tmp_path / "run"))
  traces = glob.glob(str(tmp_path / "run" / "tensorboard" / "plugins" / "profile" / "*" /
                         "*.xplane.pb"))
  assert len(traces) == 1 and _traced_steps(traces[0]) == {2, 3}


@pytest.mark.parametrize("value", [(3, 2), (0, 1), (1, 2, 3)])
def test_bad_profile_steps_are_one_line(tmp_path, value):
  config = tiny_config("clm_tiny", tmp_path, train__profile_steps=value)
  with pytest.raises(UserError, match=r"train.profile_steps must be \(first, last\)"):
    experiment_from_dict(config.to_dict())
