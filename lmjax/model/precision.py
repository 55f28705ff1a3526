"""Mixed-precision matmuls: bfloat16 operands with float32 sums (`model.dtype=bfloat16_matmuls`).

Float32 activations with bfloat16 matmul operands is what PyTorch's CPU autocast does
too; on an AMX CPU it ran clm_tiny's step at 0.87x of float32, where plain bfloat16 was
slower (XLA's CPU backend converts each bfloat16 elementwise op to float32 and back).
Which dtype `model.dtype=auto` picks on a CPU is the run's policy, not the model's:
`lmjax/cpu_dtype.py`.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

Array = jax.Array


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def mixed_matmul(x: Array, w: Array, operand_dtype: jnp.dtype) -> Array:
  """x (M, K) @ w (K, N) with operands in `operand_dtype` and float32 sums -> (M, N) float32.

  The backward pass computes dx the same way, and dW from the float32 values: dW
  contracts over the M rows, a layout XLA's CPU backend gives to Eigen, whose bfloat16
  path ran slower than float32 (3.9-5.4 vs 3.0-3.5 ms at 4096 x 128 x 512), while the
  other two ran 3.5-5x faster in bfloat16 on an AMX CPU.
  """
  return _dot(x, w, operand_dtype, ((1,), (0,)))


def _dot(a: Array, b: Array, dtype: jnp.dtype, contract) -> Array:
  return jax.lax.dot_general(a.astype(dtype), b.astype(dtype), (contract, ((), ())),
                             preferred_element_type=jnp.float32)


def _mixed_fwd(x, w, operand_dtype):
  return mixed_matmul(x, w, operand_dtype), (x, w)


def _mixed_bwd(operand_dtype, res, g):
  x, w = res
  dx = _dot(g, w, operand_dtype, ((1,), (1,)))  # (M, K)
  dw = _dot(x, g, jnp.float32, ((0,), (0,)))  # (K, N)
  return dx.astype(x.dtype), dw.astype(w.dtype)


mixed_matmul.defvjp(_mixed_fwd, _mixed_bwd)
