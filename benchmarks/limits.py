"""The machine's measured limits, the denominators of every efficiency figure:
large square matmuls in float32 and bfloat16, and memory-copy bandwidth."""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp


def best_time(fn, repeats: int) -> float:
  fn()  # compile and warm up
  best = float("inf")
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    best = min(best, time.perf_counter() - start)
  return best


def matmul_flops(dtype: str, n: int, repeats: int = 5) -> float:
  """FLOP/s of an n x n x n matmul (float32 accumulation for bfloat16)."""
  a = jnp.ones((n, n), dtype)
  b = jnp.ones((n, n), dtype) * 0.5
  mm = jax.jit(lambda x, y: jnp.matmul(x, y, preferred_element_type=jnp.float32))
  return 2 * n**3 / best_time(lambda: mm(a, b).block_until_ready(), repeats)


def copy_bandwidth(megabytes: int, repeats: int = 5) -> float:
  """Bytes/s (read + write) of an in-place elementwise pass over a large float32 array.

  Donated, so no fresh output buffer is allocated: first-touch page faults on a new
  buffer would otherwise be timed and the figure would be several times too low.
  """
  box = [jnp.zeros((megabytes * 2**20 // 4,), jnp.float32)]
  add = jax.jit(lambda v: v + 1.0, donate_argnums=0)

  def run():
    box[0] = add(box[0])
    box[0].block_until_ready()
  return 2 * box[0].nbytes / best_time(run, repeats)


def read_bandwidth(megabytes: int, repeats: int = 5) -> float:
  """Bytes/s of reading a large float32 array once (a sum): what a decode step does
  with its weights."""
  x = jnp.ones((megabytes * 2**20 // 4,), jnp.float32)
  total = jax.jit(jnp.sum)
  return x.nbytes / best_time(lambda: total(x).block_until_ready(), repeats)


class MatmulProbe:
  """A float32 matmul timed between benchmark candidates: the peak measured at the same
  moments as the steps it divides (this machine's speed drifts by tens of percent)."""

  def __init__(self, n: int = 1024, seconds: float = 0.2):
    a = jnp.ones((n, n), jnp.float32)
    self.mm = jax.jit(lambda x: x @ x)
    self.a, self.flops = a, 2 * n**3
    once = best_time(lambda: self.mm(a).block_until_ready(), 2)
    self.calls = max(1, int(seconds / once))
    self.best = 0.0

  def run(self) -> None:
    start = time.perf_counter()
    for _ in range(self.calls):
      out = self.mm(self.a)
    out.block_until_ready()
    self.best = max(self.best, self.calls * self.flops / (time.perf_counter() - start))
