"""What `model.dtype=auto` computes in on a CPU: decided by the CPU's features, never a timing.

CPUs differ: some run bfloat16 matmuls in hardware (AMX), most emulate them. Plain
bfloat16 is no gain on any CPU we measured: on an AMX CPU XLA's bfloat16 1024^3 matmul
ran 3.3x its float32 one, yet the bfloat16 train step was 1.0-1.2x *slower* (XLA's CPU
backend converts each bfloat16 elementwise op to float32 and back). A third mode,
`bfloat16_matmuls`, keeps activations in float32 and gives only the matmuls bfloat16
operands with float32 sums (PyTorch's CPU autocast does much the same); it ran
clm_tiny's step at 0.87x of float32 on the AMX CPU.

The rule (`rule`): `bfloat16_matmuls` where the CPU reports AMX bfloat16 tiles
(`amx_bf16` in /proc/cpuinfo), float32 everywhere else. It reads a fact of the machine,
so the same command on the same machine computes the same numbers every time. An
earlier rule timed a layer-shaped probe at process start; its float32/bfloat16 ratio
moved between 0.62 and 1.15 across processes on one machine, so a model's numerics
depended on how busy the machine was. The probe is still there for whoever wants it,
behind an explicit opt-in: LMJAX_CPU_DTYPE=measure (a bfloat16 mode then wins only at
>= 1.2x). LMJAX_CPU_DTYPE=float32|bfloat16|bfloat16_matmuls pins the answer (the test
suite pins float32: its tolerances are float32's).

A run keeps what `auto` meant when it started (`run_dtype`): every process computes in
process 0's answer, and a resumed run in the dtype it was started with, even on a
machine that would now answer differently.
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
MEASURE = "measure"  # LMJAX_CPU_DTYPE=measure: time the probe instead of reading the CPU
MARGIN = 1.2  # measured: bfloat16 must be this much faster, a coin flip is not worth it
CHOICES = ("float32", "bfloat16", "bfloat16_matmuls")  # what `auto` may pick on a CPU
CPUINFO = "/proc/cpuinfo"


def _layer_seconds(name: str, tokens: int = 1024, width: int = 256) -> float:
  """Best of 3: an MLP's forward and backward with float32 weights, in mode `name`."""
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((tokens, width)), jnp.float32)
  w1 = jnp.asarray(rng.standard_normal((width, 4 * width)) * 0.05, jnp.float32)
  w2 = jnp.asarray(rng.standard_normal((4 * width, width)) * 0.05, jnp.float32)
  if name == "bfloat16_matmuls":
    from lmjax.model.precision import mixed_matmul  # the layers' own matmul, timed
    dtype, matmul = jnp.float32, lambda a, b: mixed_matmul(a, b, jnp.dtype(jnp.bfloat16))
  else:
    dtype, matmul = jnp.dtype(name), lambda a, b: a @ b.astype(a.dtype)

  def loss(w1, w2, x):
    h = jax.nn.gelu(matmul(x.astype(dtype), w1))
    return jnp.sum(matmul(h, w2).astype(jnp.float32) ** 2)

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
  """Seconds per probe step in each of `CHOICES` on this CPU."""
  with jax.ensure_compile_time_eval():  # may be asked while a train step is being traced
    return {name: _layer_seconds(name) for name in CHOICES}


@functools.lru_cache(maxsize=4)
def cpu_flags(cpuinfo: str = CPUINFO) -> frozenset[str]:
  """The CPU's feature flags as the kernel reports them (empty where there is no
  /proc/cpuinfo: macOS, Windows)."""
  try:
    with open(cpuinfo) as f:
      for line in f:
        if line.startswith(("flags", "Features")):  # x86 and ARM spell it differently
          return frozenset(line.split(":", 1)[1].split())
  except OSError:
    pass
  return frozenset()


def rule(flags: frozenset[str]) -> str:
  """`auto` on a CPU with these features: bfloat16 matmul operands where there are AMX
  bfloat16 tiles, float32 elsewhere (AVX512-BF16 alone, ARM and emulated bfloat16 gain
  nothing we measured, or lose)."""
  return "bfloat16_matmuls" if "amx_bf16" in flags else "float32"


def cpu_auto_dtype() -> str:
  """What `auto` computes in on this CPU: LMJAX_CPU_DTYPE if it names a dtype, the probe's
  answer if it says `measure`, else `rule` on the CPU's features."""
  choice = os.environ.get(ENV, "")
  if choice in CHOICES:
    return choice
  if choice == MEASURE:
    seconds = measure()
    best = min(CHOICES[1:], key=lambda name: seconds.get(name, float("inf")))
    return best if seconds["float32"] >= MARGIN * seconds[best] else "float32"
  if choice:
    raise UserError(f"{ENV}={choice!r}: expected {', '.join(CHOICES)}, {MEASURE} (time a "
                    "probe), or unset (decided by the CPU's features)")
  return rule(cpu_flags())


def run_dtype(saved: str | None) -> str:
  """What `auto` means on CPU for a whole run: the dtype its checkpoints were trained in
  (`saved`, a resume), else process 0's answer, the same on every process."""
  if saved in CHOICES:
    return saved
  choice = cpu_auto_dtype() if jax.process_index() == 0 else "float32"
  if jax.process_count() > 1:  # hosts of different CPUs would compile different steps
    from jax.experimental import multihost_utils
    choice = CHOICES[int(multihost_utils.broadcast_one_to_all(np.int32(CHOICES.index(choice))))]
  return choice
