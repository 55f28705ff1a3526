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
    values.update({k: v for k, v in explicit.items() if v not in (None, "", 0, -1)})
    return cls(**values)


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
