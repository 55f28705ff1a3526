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
  """Bytes/s moved by copying a large float32 array (read + write)."""
  x = jnp.ones((megabytes * 2**20 // 4,), jnp.float32)
  copy = jax.jit(lambda v: v * 1.0 + 0.0)  # one fused elementwise pass: a read and a write
  return 2 * x.nbytes / best_time(lambda: copy(x).block_until_ready(), repeats)
