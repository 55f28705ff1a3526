"""Ahead-of-time compilation of the train step for a TPU topology, on any machine with libtpu.

XLA compiles the same sharded `train_step` that `launch.train` runs (same mesh,
rules, remat, dtype) for the devices of a topology description, without a TPU.
The compiled program tells what a run would cost before anyone pays for it:
memory per device against the chip's HBM, FLOPs against lmjax's MFU formula,
XLA's step-time estimate, and the collectives in the HLO.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import re
from typing import Any

import flax.linen as nn
import jax
import numpy as np

from lmjax.errors import UserError
from lmjax.experiment import Experiment
from lmjax.metrics import flops_per_token
from lmjax.sharding import batch_shardings, logical_to_shardings, replicated, unbox
from lmjax.steps import init_state, jit_steps

# Per chip: HBM bytes and peak bf16 FLOP/s (vendor figures).
CHIPS = {"v4": (32 << 30, 275e12), "v5e": (16 << 30, 197e12), "v5p": (95 << 30, 459e12),
         "v6e": (32 << 30, 918e12)}
HBM_BANDWIDTH = {"v4": 1.2e12, "v5e": 0.819e12, "v5p": 2.765e12, "v6e": 1.64e12}  # bytes/s
COLLECTIVES = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all")
_BYTES = {"pred": 1, "s8": 1, "u8": 1, "bf16": 2, "f16": 2, "s16": 2, "u16": 2, "f32": 4,
          "s32": 4, "u32": 4, "f64": 8, "s64": 8, "u64": 8}


def topology_devices(name: str, num_slices: int = 1) -> list[Any]:
  """The devices of a TPU topology such as "v5e:4x4", "v5p:2x2x2" or "v4:2x2x4"."""
  generation, _, shape = name.partition(":")
  if generation not in CHIPS or not re.fullmatch(r"\d+(x\d+){1,2}", shape):
    raise UserError(f"--topology {name!r}: expected GENERATION:AxB[xC] with GENERATION one of "
                    f"{', '.join(CHIPS)} (e.g. v5e:4x4, v5p:2x2x2)")
  dims = [int(d) for d in shape.split("x")] + [1] * (3 - len(shape.split("x")))
  os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")  # no cloud metadata server to ask
  # Compiling touches no chip: other processes (a second compile, a test) may load libtpu too.
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  try:
    from jax.experimental import topologies
    topo = topologies.get_topology_desc(
        platform="tpu", topology_name=name, chip_config_name="default",
        chips_per_host_bounds=tuple(min(2, d) for d in dims), num_slices=num_slices)
  except Exception as e:  # no libtpu, or a topology it does not know
    raise UserError(f"cannot describe TPU topology {name} ({str(e).splitlines()[0][:200]}); "
                    'install libtpu with pip install -e ".[tpu]"') from None
  return list(topo.devices)


def collectives(hlo: str) -> dict[str, dict[str, int]]:
  """Count and result bytes of each collective in compiled HLO text (async starts counted
  once, by their largest array)."""
  out = {name: {"count": 0, "bytes": 0} for name in COLLECTIVES}
  pattern = re.compile(r"=\s*(\(?[^=]*?\)?)\s+(" + "|".join(COLLECTIVES) + r")(-start)?\(")
  for result, op, _ in pattern.findall(hlo):
    sizes = [_BYTES.get(t, 4) * int(np.prod([int(d) for d in dims.split(",") if d] or [1]))
             for t, dims in re.findall(r"([a-z]+\d*)\[([\d,]*)\]", result)]
    out[op]["count"] += 1
    out[op]["bytes"] += max(sizes, default=0)
  return out


def compile_for_topology(exp: Experiment, topology: str, num_slices: int = 1
                         ) -> dict[str, Any]:
  """Compiles `exp`'s train step for `topology`; returns the report (see module doc).

  XLA's cost analysis counts a loop body once, so for a scanned stack the FLOPs,
  bytes and collectives per step come from two small unrolled compiles (1 and 2
  layers) extrapolated to the real depth; memory comes from the real program.
  """
  devices = topology_devices(topology, num_slices)
  # `auto` as it resolves on a TPU: bfloat16, splash attention, an unfused head.
  model = exp.model.replace(dtype="bfloat16" if exp.model.dtype == "auto" else exp.model.dtype,
                            attention_impl="splash" if exp.model.attention_impl == "auto"
                            else exp.model.attention_impl)
  objective = exp.objective  # `auto` fuses the vocabulary head on CPU only
  if getattr(objective, "fused_head", "") == "auto":
    objective = dataclasses.replace(objective, fused_head="off")
  exp = dataclasses.replace(exp, model=model, objective=objective)
  from lmjax.run import settle
  exp, source = settle(exp)  # a fine-tuning objective: init_from's architecture
  # A TPU executable cannot be stored in (or read from) this host's persistent cache.
  cache = jax.config.jax_enable_compilation_cache
  jax.config.update("jax_enable_compilation_cache", False)
  try:
    return _compile_and_report(exp, source, topology, devices)
  finally:
    jax.config.update("jax_enable_compilation_cache", cache)


def _compile_and_report(exp: Experiment, source: Any, topology: str, devices: list[Any]
                        ) -> dict[str, Any]:
  model = exp.model
  compiled = _compile(exp, source, devices)
  if isinstance(compiled, str):  # the compiler's out-of-memory message
    return {"topology": topology, "devices": len(devices), "fits": False,
            "attention_impl": model.attention_impl,
            "chip_hbm_bytes": CHIPS[topology.split(":")[0]][0], "compiler_says": compiled}
  costs = _costs(compiled)
  if model.scan_layers and model.num_layers > 2:
    small = [_costs(_compile(*_with_layers(exp, source, n), devices, COUNTING_OPTIONS))
             for n in (1, 2)]
    costs = {k: small[0][k] + (model.num_layers - 1) * (small[1][k] - small[0][k])
             for k in costs}
  kernel = kernel_attention_flops(exp) if "tpu_custom_call" in compiled.as_text() else 0.0
  costs["flops"] += kernel / len(devices)
  return _report(exp, topology, len(devices), compiled, costs, kernel)


def _with_layers(exp: Experiment, source: Any, n: int) -> tuple[Experiment, Any]:
  """The experiment (and its fine-tuning source's architecture) with `n` unrolled layers."""
  model = exp.model.replace(num_layers=n, scan_layers=False,
                            layer_types=exp.model.layer_types[:n])
  if source is not None:
    source = dataclasses.replace(source, model=model)
  return dataclasses.replace(exp, model=model), source


def kernel_attention_flops(exp: Experiment) -> float:
  """FLOPs per step of a Pallas attention kernel, which XLA's cost analysis does not see:
  forward QK^T and PV (4 per query, key and head dim), backward with the scores
  recomputed (10), over the key blocks the kernel visits: (n + 1) / 2n of n causal, the
  blocks a window reaches for a sliding-window layer."""
  model, seq, batch = exp.model, exp.data.seq_len, exp.train.batch_size
  from lmjax.model.splash import _block
  block = _block(-(-seq // 128) * 128)
  blocks = -(-seq // block)
  causal = (blocks + 1) / (2 * blocks) * seq if model.causal else seq  # keys per query
  window = min(seq, (-(-model.sliding_window // block) + 1) * block) if model.sliding_window \
      else seq
  keys = sum(min(window, causal) if local else causal for local in model.local_layers)
  return 14 * model.num_heads * model.dim_per_head * keys * seq * batch


# For the programs whose costs are counted: on large meshes XLA's TPU partitioner turns
# FSDP all-gather/reduce-scatter + matmul pairs into loops ("windowed einsums"), and the
# cost analysis counts a loop body once (llama_1b on v5e-16: 0.34x the formula's FLOPs,
# 22 loops in one layer). Without them the same work is counted in full.
COUNTING_OPTIONS = {"xla_tpu_enable_windowed_einsum_for_all_gather": False,
                    "xla_tpu_enable_windowed_einsum_for_reduce_scatter": False}


def _compile(exp: Experiment, source: Any, devices: list[Any],
             options: dict[str, Any] | None = None) -> Any:
  """The compiled train step on `devices`, or the compiler's message if it does not fit:
  the run `launch.train` would build (`lmjax.run.assemble`), for any objective."""
  from lmjax import run as run_lib
  parts = run_lib.assemble(exp, None, devices, compile_only=True, source=source)
  mesh, rules, t = parts.mesh, exp.mesh.rules, exp.train
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    abstract = jax.eval_shape(functools.partial(init_state, parts.fns, t.seed,
                                                (1, exp.data.seq_len)))
    shardings = logical_to_shardings(abstract, mesh, rules)
    state = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                         unbox(abstract), shardings)
    batch = run_lib.abstract_batch(parts)
    in_shardings = batch_shardings(mesh, rules, batch)
    batch = run_lib.abstract_batch(parts, in_shardings)
    step, _ = jit_steps(parts.fns, shardings, in_shardings, replicated(mesh))
    try:
      return step.lower(state, batch).compile(compiler_options=options)
    except jax.errors.JaxRuntimeError as e:
      if "RESOURCE_EXHAUSTED" not in str(e):
        raise
      return str(e).split("RESOURCE_EXHAUSTED:", 1)[-1].strip().splitlines()[0]


def _costs(compiled: Any) -> dict[str, float]:
  """Per-device FLOPs, bytes accessed, and collective counts and bytes of a program."""
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  out = {"flops": float(cost.get("flops", 0.0)), "bytes": float(cost.get("bytes accessed", 0.0))}
  for op, found in collectives(compiled.as_text()).items():
    out[f"{op}_count"], out[f"{op}_bytes"] = float(found["count"]), float(found["bytes"])
  return out


def memory_per_device(mem: Any) -> dict[str, int]:
  """XLA's compiled memory statistics, and the device's total: the donated train state is
  an argument and an output in one buffer (`aliased`), so it is counted once, as MaxText's
  `print_compiled_memory_stats` does (lmjax counted it twice until 2026-12-07)."""
  memory = {"arguments": mem.argument_size_in_bytes, "outputs": mem.output_size_in_bytes,
            "temporaries": mem.temp_size_in_bytes, "code": mem.generated_code_size_in_bytes,
            "aliased": mem.alias_size_in_bytes}
  total = sum(v for k, v in memory.items() if k != "aliased") - memory["aliased"]
  return {**memory, "total": total}


def _report(exp: Experiment, topology: str, n: int, compiled: Any, costs: dict[str, float],
            kernel_flops: float) -> dict[str, Any]:
  generation = topology.split(":")[0]
  hbm, peak = CHIPS[generation]
  memory = memory_per_device(compiled.memory_analysis())
  used = memory["total"]
  seq, t = exp.data.seq_len, exp.train
  formula = flops_per_token(exp.model, seq, exp.objective.predictions(seq)) * t.batch_size * seq
  # Roofline per device: the step takes at least its FLOPs at peak and its HBM traffic at
  # full bandwidth (collectives overlapped); this libtpu gives no optimal_seconds of its own.
  seconds = max(costs["flops"] / peak, costs["bytes"] / HBM_BANDWIDTH[generation])
  return {
      "topology": topology, "devices": n, "chip_hbm_bytes": hbm,
      "attention_impl": exp.model.attention_impl, "objective": exp.objective.kind,
      "fused_head": getattr(exp.objective, "fused_head", "off"),
      "pallas_kernels": compiled.as_text().count("custom_call_target=\"tpu_custom_call\""),
      "memory_per_device": memory, "fits": used <= hbm,
      "flops_per_step": {"compiled": costs["flops"] * n, "formula": formula,
                         "of_which_attention_kernel": kernel_flops,
                         "ratio": costs["flops"] * n / formula if formula else 0.0},
      "hbm_bytes_per_device": costs["bytes"],
      "step_seconds_estimate": seconds,
      "bound": "compute" if costs["flops"] / peak >= costs["bytes"] / HBM_BANDWIDTH[generation]
               else "memory",
      "tokens_per_s": t.batch_size * seq / seconds if seconds > 0 else 0.0,
      "mfu": formula / (seconds * peak * n) if seconds > 0 else 0.0,
      "collectives": {op: {"count": int(costs[f"{op}_count"]), "bytes": int(costs[f"{op}_bytes"])}
                      for op in COLLECTIVES},
  }
