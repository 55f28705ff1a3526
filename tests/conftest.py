"""Shared fixtures: tiny experiments on the bundled corpus, run on CPU."""

from __future__ import annotations

import os
import sys
import tempfile


# Tiny test models compile twice as fast without XLA's backend optimisations; set before
# jax starts, inherited by the launcher subprocesses.
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_backend_optimization_level=0").strip()

# Many tests compile the same tiny programs: share XLA's persistent cache across them and
# the subprocesses they start.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR",
                      os.path.join(tempfile.gettempdir(), "lmjax-tests-xla-cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.3")

# model.dtype=auto on CPU picks bfloat16 matmuls on AMX CPUs (lmjax/cpu_dtype.py); the
# suite's tolerances are float32's, so it pins that (tests/test_precision.py unpins it).
os.environ.setdefault("LMJAX_CPU_DTYPE", "float32")

# The suite runs on CPU. libtpu (in the test extras, for launch.compile's TPU topologies,
# which need no TPU backend) otherwise starts with every backend and writes its warnings to
# the stderr of every launcher the tests run, burying the one-line errors they check.
os.environ.setdefault("JAX_PLATFORMS", "cpu")

# No machine running the suite is on Google Cloud: for any gs:// URL gcsfs asks google-auth
# for credentials, whose probe of the metadata server otherwise waits out 15 s of timeouts.
os.environ.setdefault("NO_GCE_CHECK", "true")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # `experiments` and `launch` import from the checkout

collect_ignore = ["multidevice"]  # run by test_multidevice.py with 8 simulated devices


import pytest  # noqa: E402  (after the XLA settings above)

# The files that take longest (measured with --durations on 2 cores), handed to the two
# workers first. xdist's default for --dist loadfile is to hand out files with the most
# tests first, which left the 8-device suites (two tests, three minutes) for the end, one
# worker busy with them and the other idle.
SLOW_FIRST = ("test_multidevice.py", "test_multidevice_moe.py", "test_search.py",
              "test_optimizer_benchmarks.py", "test_grpo.py", "test_chat_use.py",
              "test_reported_bugs.py", "test_squad.py", "test_sweep_benchmarks.py",
              "test_benchmarks.py", "test_multiprocess_faults.py", "test_object_storage.py",
              "test_finetune_loop.py", "test_moe_runs.py", "test_multiprocess.py", "test_kill.py",
              "test_lm_eval.py", "test_optimizers.py", "test_wsd.py", "test_checkpoint_damage.py")


def pytest_configure(config):
  if hasattr(config.option, "loadscopereorder"):  # pytest-xdist: keep the order set below
    config.option.loadscopereorder = False


def pytest_collection_modifyitems(config, items):
  rank = {name: i for i, name in enumerate(SLOW_FIRST)}
  items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: files stay whole


@pytest.fixture(scope="session")
def tiny_runs(tmp_path_factory):
  """Tiny clm_tiny and mlm_tiny runs (30 steps) and random GPT-2, BERT and LLaMA Hugging
  Face directories, shared by the tests that use trained models."""
  from hf_models import make_hf_model
  from lmjax import train as train_lib
  from lmjax.experiment import experiment_from_dict
  from tiny import tiny_config
  tmp = tmp_path_factory.mktemp("models")
  for name in ("clm_tiny", "mlm_tiny"):
    config = tiny_config(name, tmp, train__steps=30, train__checkpoint_every=30,
                         optimizer__learning_rate=0.005)
    train_lib.train_and_evaluate(experiment_from_dict(config.to_dict()), str(tmp / name))
  for kind in ("gpt2", "bert", "llama"):
    make_hf_model(kind, str(tmp / kind))
  return tmp


@pytest.fixture(scope="session")
def decoder_model():
  """A random 2-layer model (vocab 97) and its parameters, for the decoding tests."""
  import jax
  import jax.numpy as jnp
  from lmjax.model import TransformerConfig, build_model
  cfg = TransformerConfig(vocab_size=97, max_len=64, d_model=32, num_layers=2, num_heads=4,
                          d_ff=64, init_std=0.3)
  params = build_model(cfg).init(jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32))["params"]
  return cfg, params
