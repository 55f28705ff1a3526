"""Hugging Face Flax peers (transformers 4.57, the last release with Flax models), run in
their own virtual environment: `transformers` 5 dropped Flax.

`ensure_venv()` creates it on first use (jax, flax and optax from the running
interpreter's environment; only transformers 4.57 is installed into it), relinks it to
that environment at every use and recreates it when it still cannot import them. The
worker is this file run by that environment's python, one process for the whole run:
each "build" line on stdin makes FlaxGPT2LMHeadModel or FlaxBertForMaskedLM and compiles
one AdamW train step; each "run" line is answered with the seconds `steps` steps took, so
the parent can interleave it with the other candidates.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import time

def venv_dir() -> str:
  """One peer environment per parent environment (a venv of one interpreter must not be
  reused from another's)."""
  key = hashlib.sha256(sys.prefix.encode()).hexdigest()[:12]
  return os.path.expanduser(f"~/.cache/lmjax/bench-venvs/hf-flax-4.57-{key}")


def ensure_venv() -> str:
  """Path of the peer's python, created (about a minute) when missing or when it cannot
  import what it needs. It holds transformers 4.57 only; jax, flax and optax come from the
  running interpreter's environment (`sys.prefix`: the active venv, not the base Python
  that `--system-site-packages` would expose), added after its own site-packages."""
  venv = venv_dir()
  python = os.path.join(venv, "bin", "python")
  if os.path.exists(python):
    _link_parent(python)  # cheap, and repairs a venv whose link to this environment broke
    if _works(python):
      return python
  shutil.rmtree(venv, ignore_errors=True)
  subprocess.run([sys.executable, "-m", "venv", venv], check=True)
  subprocess.run([python, "-m", "pip", "install", "-q", "transformers>=4.57,<4.58"],
                 check=True, capture_output=True)
  _link_parent(python)  # after the install, so pip never sees (nor replaces) the parent's
  if not _works(python):
    raise RuntimeError(f"the Flax peer environment {venv} cannot import jax, flax and "
                       "transformers 4.57")
  return python


def _link_parent(python: str) -> None:
  """A .pth in the peer's site-packages that adds this environment's (and runs its .pth)."""
  own = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                       check=True, capture_output=True, text=True).stdout.strip()
  parents = {sysconfig.get_paths()[k] for k in ("purelib", "platlib")}
  with open(os.path.join(own, "lmjax_parent.pth"), "w") as f:
    f.write("import site; " + "; ".join(f"site.addsitedir({p!r})" for p in sorted(parents)) +
            "\n")


def _works(python: str) -> bool:
  """Whether `python` finds jax, flax, optax and transformers 4.57: found, not imported
  (importing the Flax models takes seconds; the worker does that once)."""
  check = ("import importlib.metadata as m, importlib.util as u; "
           "assert all(u.find_spec(p) for p in ('jax', 'flax', 'optax', 'transformers')); "
           "assert m.version('transformers').startswith('4.57'), m.version('transformers')")
  return subprocess.run([python, "-c", check], capture_output=True).returncode == 0


class FlaxPeer:
  """One worker process for the whole run: `build()` compiles a shape's step inside it,
  `run()` times `steps` steps of the current shape."""

  def __init__(self):
    self.proc = subprocess.Popen([ensure_venv(), os.path.abspath(__file__)],
                                 stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                 env={**os.environ, "TRANSFORMERS_VERBOSITY": "error"})

  def _ask(self, line: str) -> str:
    self.proc.stdin.write(line + "\n")
    self.proc.stdin.flush()
    return self.proc.stdout.readline().strip()

  def build(self, objective: str, d_model: int, layers: int, seq_len: int, batch: int,
            vocab: int, steps: int) -> None:
    spec = dict(objective=objective, d_model=d_model, layers=layers, seq_len=seq_len,
                batch=batch, vocab=vocab, steps=steps)
    answer = self._ask("build " + json.dumps(spec))
    if answer != "ready":
      raise RuntimeError(f"Flax peer failed to build {spec}: {answer!r}")

  def run(self) -> float:
    return float(self._ask("run"))

  def close(self) -> None:
    self.proc.stdin.close()
    self.proc.wait(timeout=60)


def _build(spec: dict):
  """A compiled AdamW train step of the Flax model `spec` names: run() -> seconds."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  import optax
  import transformers as T
  d, h = spec["d_model"], max(spec["d_model"] // 64, 1)
  if spec["objective"] == "clm":
    model = T.FlaxGPT2LMHeadModel(T.GPT2Config(
        vocab_size=spec["vocab"], n_positions=spec["seq_len"], n_embd=d, n_layer=spec["layers"],
        n_head=h, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0), seed=0)
  else:
    model = T.FlaxBertForMaskedLM(T.BertConfig(
        vocab_size=spec["vocab"], hidden_size=d, num_hidden_layers=spec["layers"],
        num_attention_heads=h, intermediate_size=4 * d, max_position_embeddings=spec["seq_len"],
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0), seed=0)
  rng = np.random.default_rng(0)
  tokens = jnp.asarray(rng.integers(10, spec["vocab"], (spec["batch"], spec["seq_len"])), jnp.int32)
  weights = (jnp.ones(tokens.shape) if spec["objective"] == "clm"
             else jnp.asarray(rng.random(tokens.shape) < 0.15, jnp.float32))
  tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-4))

  def loss_fn(params):
    logits = model(tokens, params=params, train=False).logits
    if spec["objective"] == "clm":  # next-token targets, as GPT2LMHeadModel's loss
      logits, targets, w = logits[:, :-1], tokens[:, 1:], weights[:, 1:]
    else:
      targets, w = tokens, weights
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
    return jnp.sum(ce * w) / jnp.sum(w)

  @jax.jit
  def step(params, opt_state):
    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  state = [model.params, tx.init(model.params)]
  jax.block_until_ready(step(*state))

  def run() -> float:
    start = time.perf_counter()
    for _ in range(spec["steps"]):
      params, opt_state, loss = step(*state)
      state[:] = [params, opt_state]
    loss.block_until_ready()
    return time.perf_counter() - start
  return run


def _worker() -> None:
  run = None
  for line in sys.stdin:
    command, _, arg = line.strip().partition(" ")
    if command == "build":
      run = None  # free the previous shape first
      run = _build(json.loads(arg))
      print("ready", flush=True)
    elif command == "run" and run is not None:
      print(run(), flush=True)
    else:
      break


if __name__ == "__main__":
  _worker()
