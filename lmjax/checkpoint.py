"""Checkpoints in WORKDIR/checkpoints through one orbax CheckpointManager.

Each step directory holds two named items: `state` (params, optimizer state,
step, rng) and `meta` (the resolved config, tokenizer sha256, lmjax version).
Saves are asynchronous; `wait` blocks until the last one is durable.
"""

from __future__ import annotations

import os
from typing import Any

import orbax.checkpoint as ocp


class Checkpointer:
  """Save/restore of (state, meta) pairs, keeping the newest `keep` steps."""

  def __init__(self, workdir: str, keep: int = 3, async_save: bool = True):
    self.directory = os.path.join(os.path.abspath(workdir), "checkpoints")
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, save_interval_steps=1, enable_async_checkpointing=async_save,
        cleanup_tmp_directories=True, create=True)
    self._manager = ocp.CheckpointManager(self.directory, options=options,
                                          item_names=("state", "meta"))

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._manager.all_steps())

  def save(self, step: int, state: Any, meta: dict[str, Any]) -> bool:
    """Starts an async save of `state` and `meta` at `step` (no-op if it exists)."""
    if step in self._manager.all_steps():
      return False
    return self._manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)), force=True)

  def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict[str, Any]]:
    """Restores `state` onto the shardings in `abstract_state` (ShapeDtypeStructs)."""
    out = self._manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()))
    return out.state, dict(out.meta)

  def restore_arrays(self, step: int) -> dict[str, Any]:
    """The saved state as nested dicts of host arrays, without a target structure."""
    out = self._manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
    return out.state

  def read_meta(self, step: int) -> dict[str, Any]:
    out = self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
    return dict(out.meta)

  def wait(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()
