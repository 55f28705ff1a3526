"""What a run reports: FLOPs per token for MFU, and one writer for console, JSONL and TensorBoard."""

from __future__ import annotations

import json
import math
import re
import sys
import time
from typing import Any, Mapping

import jax
import jax.numpy as jnp
from absl import logging
from jax.extend.core import jaxprs_in_params

from lmjax import paths
from lmjax.model.config import TransformerConfig


def matmul_params(cfg: TransformerConfig) -> int:
  """Parameters that take part in a matmul per token (embedding lookups excluded,
  the output projection included, tied or not): a sparse layer's active ones, its
  router, top-k experts and shared experts, not the experts a token skips."""
  d, dh = cfg.d_model, cfg.dim_per_head
  attn = d * dh * (2 * cfg.num_heads + 2 * cfg.kv_heads)  # q, out; k, v
  mlp = lambda width: (3 if cfg.mlp == "swiglu" else 2) * d * width
  sparse = (cfg.moe.experts_per_token * mlp(cfg.expert_d_ff) + mlp(cfg.shared_d_ff)
            + d * cfg.moe.num_experts)  # routed experts, shared ones, router
  return sum(attn + (sparse if s else mlp(cfg.d_ff)) for s in cfg.sparse_layers) \
      + head_params(cfg)


def parameter_counts(cfg: TransformerConfig, total: int) -> tuple[int, int]:
  """(all parameters, those a token uses): `total` less the routed experts it skips."""
  m = cfg.moe
  expert = (3 if cfg.mlp == "swiglu" else 2) * cfg.d_model * cfg.expert_d_ff
  skipped = sum(cfg.sparse_layers) * (m.num_experts - m.experts_per_token) * expert
  return total, total - skipped if m.num_experts else total


def describe_parameters(cfg: TransformerConfig, total: int) -> str:
  """"12.3M parameters", or for a mixture of experts "48.1M parameters, 12.3M active"."""
  total, active = parameter_counts(cfg, total)
  if active == total:
    return f"{total / 1e6:.1f}M parameters"
  return f"{total / 1e6:.1f}M parameters, {active / 1e6:.1f}M active per token"


def head_params(cfg: TransformerConfig) -> int:
  """Matmul parameters of the output head: vocabulary projection (+ BERT's transform)."""
  return cfg.vocab_size * cfg.d_model + (cfg.d_model ** 2 if cfg.family == "encoder" else 0)


def flops_per_token(cfg: TransformerConfig, seq_len: int, predictions: int | None = None
                    ) -> float:
  """Training matmul FLOPs per token: 6N plus attention's 12*L*H*Dh*T (PaLM, appendix B).

  `predictions`: positions per sequence the head runs on (MLM: the K targets; default
  all). Causal attention is counted in full, as XLA computes it (the mask does not
  skip work); `tests/test_flops.py` checks this against the compiled step's matmuls.
  """
  attention = 12 * cfg.num_layers * cfg.num_heads * cfg.dim_per_head * seq_len
  skipped = 1 - (seq_len if predictions is None else predictions) / seq_len
  return 6 * (matmul_params(cfg) - skipped * head_params(cfg)) + attention


_DOT = re.compile(r"stablehlo\.dot_general[^\n]*?contracting_dims = \[([\d, ]*)\] x[^\n]*?"
                  r": \(tensor<([\dx]+)x\w+>, tensor<[^>]+>\) -> tensor<([\dx]+)x\w+>")


def lowered_dot_flops(stablehlo: str) -> float:
  """FLOPs of every dot_general in a lowered program's StableHLO text (2 * output size *
  contracted size); a loop body (scan) counts once, so check unrolled programs."""
  total = 0.0
  for m in _DOT.finditer(stablehlo):
    contracted = [int(c) for c in m.group(1).split(",") if c.strip()]
    lhs = [int(x) for x in m.group(2).split("x")]
    out = [int(x) for x in m.group(3).split("x")]
    total += 2.0 * math.prod(out) * math.prod(lhs[c] for c in contracted)
  return total


def traced_dot_flops(jaxpr: Any) -> float:
  """FLOPs of every matmul in a traced program (a ClosedJaxpr): dot_general as
  `lowered_dot_flops` counts it, and a grouped matmul (ragged_dot) at the rows it
  multiplies, 2 m k n (XLA:CPU computes it densely, every group on every row: the
  compiled program would count num_experts times the work a TPU or GPU does). Loop bodies
  (scan) count once per iteration."""
  total = 0.0
  for eqn in jaxpr.jaxpr.eqns if hasattr(jaxpr, "jaxpr") else jaxpr.eqns:
    name = eqn.primitive.name
    if name in ("dot_general", "ragged_dot_general"):
      dims = (eqn.params["dimension_numbers"] if name == "dot_general"
              else eqn.params["ragged_dot_dimension_numbers"].dot_dimension_numbers)
      (contract, _), _ = dims
      lhs = eqn.invars[0].aval.shape
      out = math.prod(eqn.outvars[0].aval.shape) * math.prod(lhs[c] for c in contract)
      groups = eqn.invars[2].aval.shape[0] if name == "ragged_dot_general" else 1
      # The weight gradient of a grouped matmul has the group axis in its output.
      grouped_out = name == "ragged_dot_general" and eqn.outvars[0].aval.ndim == 3
      total += 2.0 * out / (groups if grouped_out else 1)
    times = eqn.params.get("length", 1) if name == "scan" else 1
    for sub in jaxprs_in_params(eqn.params):
      total += times * traced_dot_flops(sub)
  return total


def peak_flops(configured: float) -> float:
  """Peak FLOP/s of one device: the config's value, else a table by device kind."""
  if configured > 0:
    return configured
  kind = jax.devices()[0].device_kind.lower()
  table = {"h100": 989e12, "h200": 989e12, "a100": 312e12, "v5 lite": 197e12, "v5p": 459e12,
           "v4": 275e12, "v6": 918e12}
  for name, flops in table.items():
    if name in kind:
      return flops
  return measure_matmul_flops()  # CPUs vary too much for a table


def measure_matmul_flops(n: int = 1024, repeats: int = 5) -> float:
  """Best-of-`repeats` float32 FLOP/s of an n x n matmul on the default device."""
  a = jnp.ones((n, n), jnp.float32)
  matmul = jax.jit(lambda x: x @ x)
  matmul(a).block_until_ready()
  best = float("inf")
  for _ in range(repeats):
    start = time.perf_counter()
    matmul(a).block_until_ready()
    best = min(best, time.perf_counter() - start)
  return 2 * n**3 / best


def format_duration(seconds: float) -> str:
  if not math.isfinite(seconds):
    return "?"
  seconds = int(seconds)
  h, rem = divmod(seconds, 3600)
  return f"{h}h{rem // 60:02d}m" if h else f"{rem // 60}m{rem % 60:02d}s"


class Throughput:
  """Tokens/s, MFU and ETA over the steps since the last measurement or restart."""

  def __init__(self, tokens_per_step: int, flops_per_token: float, peak_flops: float,
               total_steps: int):
    self.tokens_per_step, self.total_steps = tokens_per_step, total_steps
    self.flops_per_token, self.peak_flops = flops_per_token, peak_flops
    self.started = False
    self._time, self._step = time.perf_counter(), 0

  def restart(self, step: int) -> float:
    """Starts a new interval at `step`; returns the seconds since the previous one."""
    now = time.perf_counter()
    elapsed, self._time, self._step, self.started = now - self._time, now, step, True
    return elapsed

  def measure(self, step: int) -> dict[str, float]:
    steps = step - self._step
    elapsed = max(self.restart(step), 1e-9)
    rate = steps * self.tokens_per_step / elapsed
    return {"tokens_per_s": rate, "mfu": rate * self.flops_per_token / self.peak_flops,
            "eta_s": (self.total_steps - step) * elapsed / max(steps, 1)}


def _summary_writer() -> type:
  """tensorboardX's SummaryWriter, imported without torch: tensorboardX imports torch when it
  is installed (3 s at every start) only to accept torch tensors, and lmjax writes floats."""
  if "torch" in sys.modules:
    from tensorboardX import SummaryWriter
    return SummaryWriter
  sys.modules["torch"] = None  # `import torch` raises ImportError while tensorboardX loads
  try:
    from tensorboardX import SummaryWriter
  finally:
    if sys.modules.get("torch", 0) is None:  # ours, not a torch another thread imported
      del sys.modules["torch"]
  return SummaryWriter


class MetricsWriter:
  """Writes each record to the console (absl), WORKDIR/metrics.jsonl and TensorBoard.

  Only the process that is `active` (process 0) writes anything.
  """

  def __init__(self, workdir: str, active: bool = True):
    self.workdir, self.active = workdir, active
    self._jsonl = self._tb = None  # opened at the first record: a failed start writes nothing

  def _open(self) -> None:
    paths.makedirs(self.workdir)
    self._jsonl = paths.JsonlAppender(paths.join(self.workdir, "metrics.jsonl"))
    self._tb = _summary_writer()(paths.join(self.workdir, "tensorboard"))  # writes to buckets too

  def write(self, step: int, split: str, metrics: Mapping[str, Any], total_steps: int = 0) -> None:
    if not self.active:
      return
    if self._jsonl is None:
      self._open()
    values = {k: float(v) for k, v in metrics.items() if k != "eta_s"}
    record = {"step": int(step), "split": split, **values}
    self._jsonl.write(json.dumps(record) + "\n")
    for name, value in values.items():
      self._tb.add_scalar(f"{split}/{name}", value, step)
    self._tb.flush()
    logging.info("%s", self._console_line(step, split, metrics, total_steps))

  @staticmethod
  def _console_line(step: int, split: str, m: Mapping[str, Any], total_steps: int) -> str:
    line = f"[{split}] step {step}/{total_steps}"
    if "loss" not in m:  # task metrics (lm-eval): name = value
      return line + " " + " | ".join(f"{k} {float(v):.4f}" for k, v in sorted(m.items()))
    line += f" loss {float(m['loss']):.4f}"
    for key, fmt in (("accuracy", "acc {:.3f}"), ("router_balance", "balance {:.3f}"),
                     ("router_z", "router z {:.3f}"), ("learning_rate", "lr {:.2e}"),
                     ("grad_norm", "gnorm {:.3f}"), ("tokens_per_s", "{:,.0f} tok/s"),
                     ("mfu", "MFU {:.1%}"), ("f1", "F1 {:.3f}"), ("mcc", "MCC {:.3f}"),
                     ("pearson", "pearson {:.3f}"), ("spearman", "spearman {:.3f}"),
                     ("reward_accuracy", "reward acc {:.3f}"),
                     ("reward_margin", "margin {:.3f}")):
      if key in m:
        line += " | " + fmt.format(float(m[key]))
    if "eta_s" in m:
      line += f" | ETA {format_duration(float(m['eta_s']))}"
    return line

  def close(self) -> None:
    if self._jsonl is not None:
      self._jsonl.close()
      self._tb.close()
