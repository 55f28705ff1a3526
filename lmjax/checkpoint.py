"""Checkpoints in WORKDIR/checkpoints through one orbax CheckpointManager.

Each step directory holds two named items: `state` (params, optimizer state,
step, rng) and `meta` (the resolved config, tokenizer sha256, lmjax version and
a checksum per array). Saves are asynchronous; `wait` blocks until the last one
is durable. Orbax restores flipped bytes silently, so restores verify the
checksums; whatever is damaged or foreign is moved to WORKDIR/checkpoints_damaged,
never deleted.

In a bucket (gs://, s3://) a step is written in place and marked complete by its
`commit_success.txt` (orbax's protocol for stores without atomic renames); a
step directory without one is an interrupted save and is set aside like a local
temporary directory. orbax 0.12 gives TensorStore's native driver to gs:// only;
`_teach_orbax_s3` routes s3:// to TensorStore's s3 driver as well.
"""

from __future__ import annotations

import contextlib
import functools
import os
import posixpath
import re
import time
from typing import Any

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from absl import logging
from jax.experimental import multihost_utils

from lmjax import paths
from lmjax.errors import CheckpointSaveError

COMMIT_FILE = "commit_success.txt"


@functools.cache
def _teach_orbax_s3() -> None:
  """Lets orbax's TensorStore specs address s3:// natively, as it does gs://.

  orbax 0.12 normalizes `s3://b/x` to `s3:/b/x` and gives any non-gs:// path the
  local `file` driver. TensorStore's `s3` driver takes the endpoint and region
  from the spec (it does not read AWS_ENDPOINT_URL), so they come from the
  environment here. If orbax changes these private hooks, s3:// fails loudly at
  the first save rather than writing somewhere else.
  """
  from orbax.checkpoint._src.path import gcs_utils
  from orbax.checkpoint._src.serialization import tensorstore_utils as tsu
  normalize, kvstore = tsu._normalize_path, gcs_utils.get_kvstore_for_gcs

  def _normalize(path: str) -> str:
    if path.startswith("s3://"):
      return "s3://" + posixpath.normpath(path[5:])
    return normalize(path)

  def _kvstore(path: str) -> dict[str, Any]:
    if not path.startswith("s3://"):
      return kvstore(path)
    bucket, _, key = path[5:].partition("/")
    spec = {"driver": "s3", "bucket": bucket, "path": key}
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    if endpoint:
      spec["endpoint"] = endpoint
    if region:
      spec["aws_region"] = region
    return spec

  tsu._normalize_path = _normalize
  tsu._use_gcs_driver = lambda d: d.startswith(("gs://", "s3://"))
  gcs_utils.get_kvstore_for_gcs = _kvstore


def _checksum(x: jax.Array) -> jax.Array:
  """Position-weighted sum of the raw bits mod 2**32: any single flipped bit changes it,
  and it does not depend on how the array is sharded."""
  if x.dtype.itemsize == 4:
    bits = jax.lax.bitcast_convert_type(x, jnp.uint32)
  elif x.dtype.itemsize == 2:
    bits = jax.lax.bitcast_convert_type(x, jnp.uint16).astype(jnp.uint32)
  else:
    bits = x.astype(jnp.uint32)
  weights = 2 * jax.lax.iota(jnp.uint32, x.size).reshape(x.shape) + 1
  return jnp.sum(bits * weights, dtype=jnp.uint32)


@jax.jit  # one module-level function, so a state's shapes compile once, not at every save
def _checksums(state: Any) -> list[jax.Array]:
  return [_checksum(x) for x in jax.tree.leaves(state)]


def state_checksums(state: Any) -> dict[str, int]:
  """{array path: checksum} of a (possibly sharded, multi-process) state."""
  paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(state)]
  sums = _checksums(state)
  return dict(zip(paths, (int(v) for v in jax.device_get(sums))))


class DamagedCheckpoint(Exception):
  """A step whose contents do not match what was saved."""


def _barrier(name: str) -> None:
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)


class Checkpointer:
  """Save/restore of (state, meta) pairs, keeping the newest `keep` steps."""

  def __init__(self, workdir: str, keep: int = 3, async_save: bool = True,
               read_only: bool = False):
    """`read_only` opens another run's checkpoints (inference, --init_from): nothing in
    that directory is created, moved or written."""
    workdir = paths.resolve(workdir)
    self.remote = paths.is_remote(workdir)
    if self.remote:
      _teach_orbax_s3()
    self.directory = paths.join(workdir, "checkpoints")
    options = ocp.CheckpointManagerOptions(
        max_to_keep=None if read_only else keep, save_interval_steps=0 if read_only else 1,
        enable_async_checkpointing=async_save,
        cleanup_tmp_directories=False,  # we move them aside instead
        create=not read_only, read_only=read_only,
        temporary_path_class=ocp.path.atomicity.CommitFileTemporaryPath if self.remote else None)
    self.damaged_dir = paths.join(workdir, "checkpoints_damaged")
    if not read_only:
      self._set_aside_foreign_entries()
    self._manager = ocp.CheckpointManager(self.directory, options=options,
                                          item_names=("state", "meta"))
    self._pending: int | None = None  # step of the save that may still be in flight

  def _set_aside_foreign_entries(self) -> None:
    """Only numeric step directories stay: interrupted saves (temporary directories; in a
    bucket, steps without their commit file), links and anything else are moved aside
    with a warning."""
    if jax.process_index() == 0:
      for name in paths.listdir(self.directory):
        path = paths.join(self.directory, name)
        if not self.remote and os.path.islink(path):
          self._move_aside(name, "a link, which could lead outside the workdir")
        elif not name.isdigit():
          reason = "unfinished save" if "tmp" in name else "not a step directory"
          self._move_aside(name, reason)
        elif self.remote and not paths.exists(paths.join(path, COMMIT_FILE)):
          self._move_aside(name, f"unfinished save (no {COMMIT_FILE})")
    _barrier("lmjax_checkpoint_scan")

  def _move_aside(self, name: str, reason: str) -> None:
    paths.makedirs(self.damaged_dir)
    target = paths.join(self.damaged_dir, f"{name}.{int(time.time() * 1000)}")
    paths.move(paths.join(self.directory, name), target)
    logging.warning("checkpoint %s: %s; moved to %s", name, reason, target)

  def set_aside(self, step: int, reason: str) -> None:
    """Moves a damaged step out of the way (all processes call this together)."""
    if jax.process_index() == 0:
      self._move_aside(str(step), f"damaged ({reason})")
    _barrier(f"lmjax_set_aside_{step}")
    self._manager.reload()

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._manager.all_steps())

  def save(self, step: int, state: Any, meta: dict[str, Any]) -> bool:
    """Starts an async save of `state` and `meta` at `step` (no-op if it exists).
    A failed write, this one's or the previous async one's, raises CheckpointSaveError."""
    if step in self._manager.all_steps():
      return False
    meta = {**meta, "checksums": state_checksums(state)}
    with self._saving(step):
      self._manager.wait_until_finished()  # a failed earlier save is reported as such
      self._pending = step
      return self._manager.save(step, args=ocp.args.Composite(
          state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)), force=True)

  @contextlib.contextmanager
  def _saving(self, step: int):
    try:
      yield
    except Exception as e:  # orbax reports I/O failures as assorted exception types
      failed = self._pending if self._pending is not None else step
      good = [s for s in self._manager.all_steps() if s != failed]
      kept = f"step {max(good)} is intact" if good else "no earlier step exists"
      raise CheckpointSaveError(
          f"writing checkpoint step {failed} in {self.directory} failed ({_os_reason(e)}); "
          f"{kept}; the partial write is moved aside at the next start. Free space and "
          "run the same command again") from None

  def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict[str, Any]]:
    """Restores `state` onto the shardings in `abstract_state` (ShapeDtypeStructs) and
    verifies its checksums; a mismatch raises `DamagedCheckpoint`."""
    out = self._manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()))
    meta = dict(out.meta)
    expected = meta.get("checksums", {})
    bad = [k for k, v in state_checksums(out.state).items() if expected.get(k) != v]
    if bad:
      raise DamagedCheckpoint(f"checksum mismatch in {bad[0]}" +
                              (f" and {len(bad) - 1} more arrays" if len(bad) > 1 else ""))
    return out.state, meta

  def restore_arrays(self, step: int) -> dict[str, Any]:
    """The saved state as nested dicts of arrays on this process's first device, without a
    target structure: readable whatever devices and processes saved it (orbax restores a
    target-less tree onto the saved sharding, which fails on another topology)."""
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    tree = ocp.StandardCheckpointer().metadata(self._manager.directory / str(step) / "state")
    target = jax.tree.map(
        lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device)
        if hasattr(m, "shape") and hasattr(m, "dtype") else m, tree.item_metadata.tree)
    out = self._manager.restore(
        step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target)))
    return out.state

  def restore_params(self, step: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """(params, meta) of `step` as host arrays, checksums verified (inference, init_from)."""
    meta = self.read_meta(step)
    params = self.restore_arrays(step)["params"]
    expected = meta.get("checksums", {})
    for key, value in state_checksums(params).items():
      if expected.get(".params" + key) != value:
        raise DamagedCheckpoint(f"checksum mismatch in params{key}")
    return params, meta

  def read_meta(self, step: int) -> dict[str, Any]:
    out = self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
    return dict(out.meta)

  def wait(self) -> None:
    with self._saving(-1):
      self._manager.wait_until_finished()
    self._pending = None

  def close(self) -> None:
    self.wait()
    self._manager.close()


def _os_reason(error: Exception) -> str:
  """'No space left on device' rather than a page of tensorstore context."""
  text = str(error)
  code = re.search(r"os_error_code='?(\d+)", text)
  if code:
    return os.strerror(int(code.group(1)))
  if isinstance(error, OSError) and error.strerror:
    return error.strerror
  return f"{type(error).__name__}: {text.splitlines()[0][:200] if text else ''}"
