"""LoRA on a mesh: the adapters shard as their layers do and training on 8 simulated
devices equals one device."""

import numpy as np
import pytest

from test_equivalence import _experiment, _losses


@pytest.mark.parametrize("mesh", [(2, 2, 2), (1, 1, 8)])
def test_lora_training_on_a_mesh_matches_one_device(tmp_path, monkeypatch, mesh):
  import dataclasses
  base = tmp_path / "base"
  _losses(_experiment(tmp_path, "clm_tiny", (1, 1, 1), train__steps=2), base, monkeypatch,
          one_device=True)
  runs = {}
  for name, shape in (("one", (1, 1, 1)), ("mesh", mesh)):
    exp = _experiment(tmp_path, "clm_tiny", shape, train__init_from=str(base))
    exp = dataclasses.replace(exp, lora=dataclasses.replace(
        exp.lora, enabled=True, rank=4, targets=("attention_mlp",)))
    runs[name] = _losses(exp, tmp_path / name, monkeypatch, one_device=name == "one")
  assert len(runs["mesh"][0]) == 5
  np.testing.assert_allclose(runs["mesh"][0], runs["one"][0], rtol=2e-4, atol=2e-4)
  np.testing.assert_allclose(runs["mesh"][1], runs["one"][1], rtol=2e-4)
