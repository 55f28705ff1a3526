"""Low-rank adapters on a frozen base: y = x W + (alpha/r) (dropout(x) A) B.

The adapters live in the parameter tree beside the kernel they adapt (`lora_a`,
`lora_b` in the dense layer's scope; a scanned stack gives them its layer axis), so
they shard, scan and checkpoint as the base does. The model code knows nothing of
them: `LoraModel` runs the model under a flax method interceptor that adds the
low-rank term to every dense layer holding adapters, and computes the base matmul
from a quantized kernel when the base is kept quantized (QLoRA), one layer at a time.
A is initialised as PEFT's kaiming-uniform (bound 1/sqrt(fan_in)), B as zeros, so a
fresh adapter leaves the model's outputs exactly as the base computes them.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import re
import zlib
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from lmjax.errors import UserError
from lmjax.lora import quant
from lmjax.lora.config import LoraConfig
from lmjax.model.layers import Dense
from lmjax.model.precision import mixed_matmul

ADAPTER_LEAVES = ("lora_a", "lora_b")


@dataclasses.dataclass(frozen=True)
class DenseInfo:
  in_shape: tuple[int, ...]  # one layer's input axes (after a scanned stack's layer axis)
  features: tuple[int, ...]  # its output axes


def dense_layers(module: nn.Module, *sample: Any) -> dict[str, DenseInfo]:
  """{layer name: shape} of every dense layer `module` builds (traced, nothing computed)."""
  found: dict[str, DenseInfo] = {}

  def record(next_fun, args, kwargs, context):
    m = context.module
    if isinstance(m, Dense) and context.method_name == "__call__":
      x = args[0]
      found["/".join(m.scope.path)] = DenseInfo(tuple(x.shape[x.ndim - m.num_in:]),
                                                tuple(m.features))
    return next_fun(*args, **kwargs)

  with nn.intercept_methods(record):
    jax.eval_shape(module.init, jax.random.PRNGKey(0), *sample)
  return found


def targeted(cfg: LoraConfig, layers: dict[str, DenseInfo], is_new: Callable[[str], bool]
             ) -> dict[str, DenseInfo]:
  """The layers `cfg.targets` selects; a pattern matching none, or a rank above a
  layer's width, is a one-line error."""
  candidates = {k: v for k, v in layers.items() if not is_new(k + "/kernel")}
  for pattern in cfg.patterns():
    if not any(re.search(pattern, k) for k in candidates):
      names = ", ".join(sorted(candidates)) or "none"
      raise UserError(f"lora.targets: {pattern!r} matches no dense layer (layers: {names})")
  chosen = {k: v for k, v in candidates.items() if cfg.matches(k)}
  for name, info in chosen.items():
    width = min(math.prod(info.in_shape), math.prod(info.features))
    if cfg.rank > width:
      raise UserError(f"lora.rank={cfg.rank} exceeds the width {width} of layer {name}")
  return chosen


def _node(tree: dict[str, Any], layer: str) -> dict[str, Any]:
  for key in layer.split("/"):
    tree = tree[key]
  return tree


def add_adapters(params: dict[str, Any], layers: dict[str, DenseInfo], rank: int,
                 rng: jax.Array) -> dict[str, Any]:
  """`params` (boxed or not) with lora_a (kaiming-uniform) and lora_b (zeros) beside each
  named layer's kernel; boxed kernels give the adapters their logical axes."""
  params = jax.tree.map(lambda x: x, params, is_leaf=lambda x: not isinstance(x, dict))
  for name, info in layers.items():
    node = _node(params, name)
    kernel = node["kernel"]
    boxed = isinstance(kernel, nn.Partitioned)
    value = kernel.value if boxed else kernel
    lead = value.shape[:value.ndim - len(info.in_shape) - len(info.features)]
    bound = 1.0 / math.sqrt(math.prod(info.in_shape))  # kaiming_uniform_(a=sqrt(5))
    key = jax.random.fold_in(rng, zlib.crc32(name.encode()))
    a = jax.random.uniform(key, (*lead, *info.in_shape, rank), value.dtype, -bound, bound)
    b = jnp.zeros((*lead, rank, *info.features), value.dtype)
    if boxed:
      names = kernel.names
      n_in = len(lead) + len(info.in_shape)
      a = kernel.replace_boxed(a).replace(names=(*names[:n_in], None))
      b = kernel.replace_boxed(b).replace(names=(*names[:len(lead)], None, *names[n_in:]))
    node["lora_a"], node["lora_b"] = a, b
  return params


def select(params: dict[str, Any], keep: Callable[[str], bool], prefix: str = ""
           ) -> dict[str, Any]:
  """The sub-tree of the leaves whose name `keep` accepts (empty branches dropped)."""
  out = {}
  for key, value in params.items():
    name = f"{prefix}{key}"
    if isinstance(value, dict):
      sub = select(value, keep, name + "/")
      if sub:
        out[key] = sub
    elif keep(name):
      out[key] = value
  return out


def combine(params: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
  """`params` with the leaves of `update` (a `select`ed tree) put in."""
  out = dict(params)
  for key, value in update.items():
    out[key] = combine(params.get(key, {}), value) if isinstance(value, dict) else value
  return out


def is_adapter(name: str) -> bool:
  return name.rsplit("/", 1)[-1] in ADAPTER_LEAVES


def without_adapters(params: dict[str, Any]) -> dict[str, Any]:
  """The base model: every adapter removed (the interceptor then leaves layers alone)."""
  return select(params, lambda name: not is_adapter(name))


class LoraModel:
  """A flax module run with the adapters of its parameters applied (`dropout` > 0 draws
  from the `dropout` rng); everything else is the wrapped module's."""

  def __init__(self, module: nn.Module, scale: float, dropout: float = 0.0):
    self.module, self.scale, self.dropout = module, scale, dropout

  def __getattr__(self, name: str) -> Any:
    return getattr(self.module, name)

  def apply(self, *args, **kwargs):
    with nn.intercept_methods(self._intercept):
      return self.module.apply(*args, **kwargs)

  def init(self, *args, **kwargs):
    return self.module.init(*args, **kwargs)

  def _intercept(self, next_fun, args, kwargs, context):
    m = context.module
    if not (isinstance(m, Dense) and context.method_name == "__call__"):
      return next_fun(*args, **kwargs)
    p = m.variables.get("params", {})
    if "lora_a" not in p and not quant.is_quantized(p):
      return next_fun(*args, **kwargs)
    x = args[0]
    y = _base_matmul(m, x, p) if quant.is_quantized(p) else next_fun(*args, **kwargs)
    if "lora_a" not in p:
      return y
    return y + self._delta(m, x, p["lora_a"], p["lora_b"])

  def _delta(self, m: Dense, x: jax.Array, a: jax.Array, b: jax.Array) -> jax.Array:
    rank = a.shape[-1]
    batch = x.shape[:x.ndim - m.num_in]
    x2 = x.reshape(-1, math.prod(x.shape[x.ndim - m.num_in:])).astype(m.dtype)
    if self.dropout > 0:
      keep = jax.random.bernoulli(m.make_rng("dropout"), 1.0 - self.dropout, x2.shape)
      x2 = jnp.where(keep, x2 / (1.0 - self.dropout), 0).astype(m.dtype)
    h = x2 @ a.reshape(-1, rank).astype(m.dtype)
    out = (h @ b.reshape(rank, -1).astype(m.dtype)) * jnp.asarray(self.scale, m.dtype)
    return out.reshape(*batch, *m.features)


def _base_matmul(m: Dense, x: jax.Array, p: Any) -> jax.Array:
  """Dense's own computation (`lmjax.model.layers.Dense`) on a dequantized kernel."""
  in_shape = x.shape[x.ndim - m.num_in:]
  batch = x.shape[:x.ndim - m.num_in]
  x2 = x.reshape(-1, math.prod(in_shape)).astype(m.dtype)
  size = x2.shape[1] * math.prod(m.features)  # NF4 pads its last block
  kernel = quant.dequantize(p, m.param_dtype).reshape(-1)[:size].reshape(x2.shape[1], -1)
  if m.matmul_dtype is not None and m.matmul_dtype != m.dtype:
    y = mixed_matmul(x2, kernel, m.matmul_dtype).astype(m.dtype)
  else:
    y = x2 @ kernel.astype(m.dtype)
  y = y.reshape(*batch, *m.features)
  if "bias" in p:
    y = y + p["bias"].astype(m.dtype)
  return y


def merged(params: dict[str, Any], scale: float) -> dict[str, Any]:
  """Host parameters with each adapter folded into its (float) kernel and removed:
  W + scale A B, as a model without adapter code loads them."""
  out = without_adapters(params)
  _merge_into(out, params, np.float32(scale))
  return out


def _merge_into(out: dict[str, Any], src: dict[str, Any], scale: np.float32) -> None:
  for key, value in src.items():
    if isinstance(value, dict) and key in out:
      _merge_into(out[key], value, scale)
  if "lora_a" not in src or "kernel" not in out:
    return
  kernel = np.asarray(out["kernel"])
  a, b = np.asarray(src["lora_a"], np.float32), np.asarray(src["lora_b"], np.float32)
  lead = a.ndim + b.ndim - 2 - kernel.ndim  # a stacked layer axis, if any
  rank = a.shape[-1]
  a2 = a.reshape(*a.shape[:lead], -1, rank)
  b2 = b.reshape(*b.shape[:lead], rank, -1)
  delta = (a2 @ b2 * scale).reshape(kernel.shape)
  out["kernel"] = (kernel.astype(np.float32) + delta).astype(kernel.dtype)


def fit(kernel_shape: tuple[int, ...], a: Any, b: Any) -> tuple[Any, Any]:
  """Flat adapters, a (*lead, in, r) and b (*lead, r, out), shaped for a kernel of
  `kernel_shape` (*lead, *in_axes, *out_axes): a (*lead, *in_axes, r), b (*lead, r, *out)."""
  lead, rank = a.ndim - 2, a.shape[-1]
  size, k = 1, lead
  while k < len(kernel_shape) and size < a.shape[-2]:
    size, k = size * kernel_shape[k], k + 1
  if size != a.shape[-2] or math.prod(kernel_shape[k:]) != b.shape[-1] or \
      tuple(kernel_shape[:lead]) != tuple(a.shape[:lead]):
    raise UserError(f"an adapter of shapes {tuple(a.shape)}, {tuple(b.shape)} does not fit a "
                    f"kernel of shape {tuple(kernel_shape)} (made for another base?)")
  return (a.reshape(*kernel_shape[:k], rank),
          b.reshape(*kernel_shape[:lead], rank, *kernel_shape[k:]))


def checksum(params: dict[str, Any]) -> str:
  """sha256 of a parameter tree's names, shapes and bytes (host arrays): the base's
  identity, kept in a LoRA run's checkpoints."""
  h = hashlib.sha256()
  for path, value in sorted(jax.tree_util.tree_leaves_with_path(params),
                            key=lambda kv: jax.tree_util.keystr(kv[0])):
    array = np.ascontiguousarray(np.asarray(value))
    h.update(f"{jax.tree_util.keystr(path)}:{array.dtype}:{array.shape};".encode())
    h.update(array.tobytes())
  return h.hexdigest()
