"""What `model.dtype=auto` computes in on a CPU: bfloat16 only where it is measured faster.

CPUs differ: some run bfloat16 matmuls in hardware (AMX, AVX512-BF16), most emulate
them. A raw large-matmul probe is not enough: on an AMX CPU XLA's bfloat16 1024^3
matmul ran 3.3x its float32 one, yet the bfloat16 train step was 1.0-1.2x *slower*
(casts and elementwise work dominate at these widths). So the probe times what a
Transformer layer does, an MLP forward and backward at width 256 on 1,024 tokens with
float32 master weights, in both dtypes; bfloat16 wins only at >= 1.2x. Measured
once per process (~0.5 s). LMJAX_CPU_DTYPE=float32|bfloat16 skips the measurement
(the test suite pins float32: its tolerances are float32's).

A measurement near the margin can come out either way (the probe's ratio moved from
0.62 to 1.15 between processes on one machine), so a run measures once, on process 0,
and keeps the answer: `run_dtype` gives every process the same dtype, and a resumed run
the dtype it was started with.
"""

from __future__ import annotations

import functools
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from lmjax.errors import UserError

ENV = "LMJAX_CPU_DTYPE"
MARGIN = 1.2  # bfloat16 must be this much faster: a coin flip is not worth the precision


def _layer_seconds(dtype: jnp.dtype, tokens: int = 1024, width: int = 256) -> float:
  """Best of 3: an MLP's forward and backward with float32 weights computed in `dtype`."""
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((tokens, width)), jnp.float32)
  w1 = jnp.asarray(rng.standard_normal((width, 4 * width)) * 0.05, jnp.float32)
  w2 = jnp.asarray(rng.standard_normal((4 * width, width)) * 0.05, jnp.float32)

  def loss(w1, w2, x):
    h = jax.nn.gelu(x.astype(dtype) @ w1.astype(dtype))
    return jnp.sum((h @ w2.astype(dtype)).astype(jnp.float32) ** 2)

  step = jax.jit(jax.grad(loss, argnums=(0, 1)))
  jax.block_until_ready(step(w1, w2, x))
  best = float("inf")
  for _ in range(3):
    start = time.perf_counter()
    jax.block_until_ready(step(w1, w2, x))
    best = min(best, time.perf_counter() - start)
  return best


@functools.lru_cache(maxsize=1)
def measure() -> dict[str, float]:
  """Seconds per probe step in float32 and bfloat16 on this CPU."""
  with jax.ensure_compile_time_eval():  # may be asked while a train step is being traced
    return {name: _layer_seconds(jnp.dtype(name)) for name in ("float32", "bfloat16")}


def cpu_auto_dtype() -> str:
  """float32 or bfloat16, whichever `auto` computes in on this CPU."""
  choice = os.environ.get(ENV, "")
  if choice in ("float32", "bfloat16"):
    return choice
  if choice:
    raise UserError(f"{ENV}={choice!r}: expected float32 or bfloat16 (or unset to measure)")
  seconds = measure()
  return "bfloat16" if seconds["float32"] >= MARGIN * seconds["bfloat16"] else "float32"


def run_dtype(saved: str | None) -> str:
  """What `auto` means on CPU for a whole run: the dtype its checkpoints were trained in
  (`saved`, a resume), else process 0's measurement, the same on every process."""
  if saved in ("float32", "bfloat16"):
    return saved
  choice = cpu_auto_dtype() if jax.process_index() == 0 else "float32"
  if jax.process_count() > 1:  # processes that measured differently would compile different steps
    from jax.experimental import multihost_utils
    code = multihost_utils.broadcast_one_to_all(np.int32(choice == "bfloat16"))
    choice = "bfloat16" if int(code) else "float32"
  return choice
