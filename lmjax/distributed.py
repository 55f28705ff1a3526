"""Joining JAX's multi-controller runtime: from explicit settings or the environment.

One process per host (or per GPU) runs the same program; `initialize` must run
before anything touches a device. Sources, in order: explicit arguments
(flags), LMJAX_* variables (set by `launch.local`), then cluster auto-detection
(SLURM, TPU pod slices). A finite heartbeat timeout makes survivors of a dead
peer exit instead of hanging.
"""

from __future__ import annotations

import dataclasses
import os

import jax
from absl import logging

from lmjax.errors import check_ranges


@dataclasses.dataclass(frozen=True)
class DistributedConfig:
  coordinator_address: str = ""  # host:port of process 0; empty = environment / single process
  num_processes: int = 0
  process_id: int = -1
  cpu_devices: int = 0  # simulated CPU devices per process (tests, laptops); 0 = default
  heartbeat_timeout_s: int = 60  # a peer silent this long is dead; the others exit
  init_timeout_s: int = 300

  @classmethod
  def from_env(cls, **explicit) -> "DistributedConfig":
    """Explicit values win; unset ones come from LMJAX_COORDINATOR_ADDRESS,
    LMJAX_NUM_PROCESSES, LMJAX_PROCESS_ID and LMJAX_CPU_DEVICES."""
    env = os.environ
    values = {
        "coordinator_address": env.get("LMJAX_COORDINATOR_ADDRESS", ""),
        "num_processes": int(env.get("LMJAX_NUM_PROCESSES", 0)),
        "process_id": int(env.get("LMJAX_PROCESS_ID", -1)),
        "cpu_devices": int(env.get("LMJAX_CPU_DEVICES", 0)),
    }
    defaults = cls()  # an explicit value equal to the field's default counts as unset
    values.update({k: v for k, v in explicit.items()
                   if v is not None and v != getattr(defaults, k)})
    return cls(**values)


@dataclasses.dataclass(frozen=True)
class RuntimeConfig:
  compilation_cache_dir: str = "~/.cache/lmjax/xla"  # persistent compilation cache; "" = off
  gpu_latency_hiding_scheduler: bool = True  # GPU: overlap collectives with compute
  gpu_collective_combine_bytes: int = 0  # GPU: combine threshold for all-gather,
  # reduce-scatter and all-reduce (0 = XLA's default); larger means fewer, bigger collectives
  xla_flags: str = ""  # further XLA_FLAGS, appended verbatim

  def __post_init__(self):
    check_ranges("runtime", self, non_negative=("gpu_collective_combine_bytes",))


def apply_runtime(cfg: RuntimeConfig) -> None:
  """Sets XLA flags and the compilation cache; must run before the backend starts."""
  flags = []
  if cfg.gpu_latency_hiding_scheduler:
    flags.append("--xla_gpu_enable_latency_hiding_scheduler=true")
  if cfg.gpu_collective_combine_bytes:
    flags += [f"--xla_gpu_{kind}_combine_threshold_bytes={cfg.gpu_collective_combine_bytes}"
              for kind in ("all_gather", "reduce_scatter", "all_reduce")]
  flags += cfg.xla_flags.split()
  os.environ["XLA_FLAGS"] = " ".join([os.environ.get("XLA_FLAGS", ""), *flags]).strip()
  if cfg.compilation_cache_dir:
    jax.config.update("jax_compilation_cache_dir", os.path.expanduser(cfg.compilation_cache_dir))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)


def _cluster_detected() -> bool:
  env = os.environ
  slurm = int(env.get("SLURM_NTASKS", env.get("SLURM_NPROCS", "1")) or 1) > 1
  tpu_pod = "," in env.get("TPU_WORKER_HOSTNAMES", "")
  return slurm or tpu_pod


def initialize(cfg: DistributedConfig) -> None:
  """Sets simulated CPU devices and joins the distributed runtime when there is one."""
  if cfg.cpu_devices:
    jax.config.update("jax_num_cpu_devices", cfg.cpu_devices)
  timeouts = dict(heartbeat_timeout_seconds=cfg.heartbeat_timeout_s,
                  initialization_timeout=cfg.init_timeout_s)
  if cfg.coordinator_address or cfg.num_processes > 1:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")  # CPU-only setting
    jax.distributed.initialize(cfg.coordinator_address, cfg.num_processes, cfg.process_id,
                               **timeouts)
  elif _cluster_detected():
    jax.distributed.initialize(**timeouts)
  else:
    return
  logging.info("process %d of %d; %d local / %d global devices", jax.process_index(),
               jax.process_count(), jax.local_device_count(), jax.device_count())
