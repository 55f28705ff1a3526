"""One path layer for run directories and token stores: local paths and bucket URLs.

A path with a scheme (`gs://bucket/run`, `s3://bucket/run`) goes through fsspec
(gcsfs, s3fs: `pip install -e ".[gcs]"` or `".[s3]"`); any other path goes
through `os` exactly as before, so local runs do not change. Object stores have
no directories, renames or appends, which shapes three functions here:
`write_atomic` is one PUT (atomic on both stores), `move` copies then deletes,
and `JsonlAppender` rewrites its whole object on flush.

Store shards are read by byte ranges through `RangeFile`, with a bounded LRU of
fixed-size blocks per process (`LMJAX_REMOTE_CACHE_MB`, default 256).
"""

from __future__ import annotations

import collections
import os
import posixpath
import shutil
import socket
import tempfile
import threading
import time
from typing import IO, Any, Iterable

from lmjax.errors import UserError

_EXTRAS = {"gs": "gcs", "gcs": "gcs", "s3": "s3"}


def is_remote(path: str) -> bool:
  return "://" in str(path)


def resolve(path: str) -> str:
  """An absolute local path, or the URL without a trailing slash."""
  path = str(path)
  return path.rstrip("/") if is_remote(path) else os.path.abspath(os.path.expanduser(path))


def join(base: str, *names: str) -> str:
  return posixpath.join(base, *names) if is_remote(base) else os.path.join(base, *names)


def dirname(path: str) -> str:
  return posixpath.dirname(path.rstrip("/")) if is_remote(path) else os.path.dirname(path)


def filesystem(url: str) -> tuple[Any, str]:
  """(fsspec filesystem, path inside it) of a bucket URL; one line if its package is missing."""
  scheme = url.split("://", 1)[0]
  try:
    import fsspec
    return fsspec.core.url_to_fs(url)
  except (ImportError, ValueError) as e:
    extra = _EXTRAS.get(scheme)
    hint = f'pip install -e ".[{extra}]"' if extra else "install its fsspec package"
    raise UserError(f"{url}: no filesystem for {scheme}:// ({e}); {hint}") from None


def describe(url: str, error: BaseException) -> str:
  """One line for a failed bucket operation: which bucket, why, what to check."""
  name = type(error).__name__
  text = str(error).splitlines()[0][:160] if str(error) else name
  if "Credential" in name or "credential" in text.lower():
    why = ("no credentials found: set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY (S3) or run "
           "`gcloud auth application-default login` (GCS)")
  elif isinstance(error, FileNotFoundError) or "NoSuchBucket" in text:
    why = f"{text}: check the bucket name"
  elif isinstance(error, PermissionError) or "AccessDenied" in text or "Forbidden" in text:
    why = f"access denied ({text}): check the credentials' permissions on the bucket"
  elif "Invalid bucket name" in text or "ParamValidation" in name:
    why = f"invalid bucket name ({text.split(':', 1)[-1].strip()[:100]})"
  else:
    why = f"{name}: {text}"
  return f"{url}: {why}"


def check_access(url: str, write: bool) -> None:
  """Lists `url`, and with `write` puts and deletes a probe object: a bad bucket name, a
  missing bucket or missing credentials fail here in one line, before a run writes."""
  if not is_remote(url):
    return
  fs, path = filesystem(url)
  try:
    try:
      fs.info(path.split("/", 1)[0])  # the bucket exists (a missing one fails here)
    except PermissionError:  # object-level grants only: the probe below decides
      pass
    if write:
      probe = posixpath.join(path, f".lmjax_probe.{os.getpid()}")
      fs.pipe_file(probe, b"")
      fs.rm_file(probe)
  except Exception as e:  # botocore/google errors have no common base
    raise UserError(describe(url, e)) from None


# ----------------------------------------------------------------------------- files


def exists(path: str) -> bool:
  if not is_remote(path):
    return os.path.exists(path)
  fs, p = filesystem(path)
  return fs.exists(p)


def isdir(path: str) -> bool:
  if not is_remote(path):
    return os.path.isdir(path)
  fs, p = filesystem(path)
  return fs.isdir(p)


def isfile(path: str) -> bool:
  if not is_remote(path):
    return os.path.isfile(path)
  fs, p = filesystem(path)
  return fs.isfile(p)


def listdir(path: str) -> list[str]:
  """Names in a directory (a bucket prefix); [] if there is none."""
  if not is_remote(path):
    return sorted(os.listdir(path)) if os.path.isdir(path) else []
  fs, p = filesystem(path)
  try:
    return sorted(posixpath.basename(e.rstrip("/")) for e in fs.ls(p, detail=False, refresh=True))
  except FileNotFoundError:
    return []


def makedirs(path: str) -> None:
  """A local directory; nothing on object stores, where prefixes need no creating."""
  if not is_remote(path):
    os.makedirs(path, exist_ok=True)


def getsize(path: str) -> int:
  if not is_remote(path):
    return os.path.getsize(path)
  fs, p = filesystem(path)
  return int(fs.size(p))


def remove(path: str) -> None:
  if not is_remote(path):
    os.remove(path)
    return
  fs, p = filesystem(path)
  fs.rm_file(p)


def move(src: str, dst: str) -> None:
  """Renames a file or directory (on object stores: copies, then deletes the source)."""
  if not is_remote(src):
    os.rename(src, dst)
    return
  fs, s = filesystem(src)
  _, d = filesystem(dst)
  if fs.isdir(s):
    for key in fs.find(s):
      fs.copy(key, d + key[len(s):])
    fs.rm(s, recursive=True)
  else:
    fs.mv(s, d)


def open_file(path: str, mode: str = "rb", **kwargs: Any) -> IO:
  if not is_remote(path):
    return open(path, mode, **kwargs)
  fs, p = filesystem(path)
  return fs.open(p, mode, **kwargs)


def read_bytes(path: str) -> bytes:
  with open_file(path, "rb") as f:
    return f.read()


def write_atomic(path: str, data: bytes | str) -> None:
  """Writes a whole file: a reader sees the old contents or the new, never half. Locally a
  temporary file named by this process is renamed over the target; on an object store one
  PUT is already atomic."""
  data = data.encode() if isinstance(data, str) else data
  if is_remote(path):
    fs, p = filesystem(path)
    fs.pipe_file(p, data)
    return
  folder, name = os.path.split(path)
  tmp = os.path.join(folder, f".{name}.{tmp_tag()}")
  with open(tmp, "wb") as f:
    f.write(data)
  os.replace(tmp, path)


def tmp_tag() -> str:
  """The last dot-part of a temporary file's name: who writes it (hosts sharing a
  directory never collide, and a later run can tell a dead writer's leftovers)."""
  return f"tmp-{socket.gethostname().replace('.', '_')}-{os.getpid()}"


def put_file(local: str, dest: str) -> None:
  """Moves a finished local file to `dest` (an upload when `dest` is in a bucket)."""
  if not is_remote(dest):
    os.replace(local, dest)
    return
  fs, p = filesystem(dest)
  fs.put_file(local, p)
  os.remove(local)


def put_tree(local_dir: str, dest: str) -> None:
  """Uploads a local directory's files under `dest` (profiler traces)."""
  fs, p = filesystem(dest)
  for root, _, names in os.walk(local_dir):
    for name in names:
      rel = os.path.relpath(os.path.join(root, name), local_dir)
      fs.put_file(os.path.join(root, name), posixpath.join(p, rel.replace(os.sep, "/")))


def local_staging(path: str) -> str:
  """`path` itself if local, else a fresh local directory to write into before `put_tree`."""
  return path if not is_remote(path) else tempfile.mkdtemp(prefix="lmjax-")


def remove_local_staging(local: str, path: str) -> None:
  if is_remote(path):
    shutil.rmtree(local, ignore_errors=True)


class JsonlAppender:
  """Lines appended to a file. Locally an append-mode file flushed per line; an object
  cannot be appended to, so in a bucket the whole object is rewritten (one atomic PUT of
  what it held at open plus every line since), at most every `min_interval` seconds and
  at `close`."""

  def __init__(self, path: str, min_interval: float = 10.0):
    self.path, self.min_interval = path, min_interval
    self._remote = is_remote(path)
    self._last = 0.0
    if self._remote:
      self._lines = [read_bytes(path)] if exists(path) else []
    else:
      self._file = open(path, "a", encoding="utf-8")

  def write(self, line: str) -> None:
    if not self._remote:
      self._file.write(line)
      self._file.flush()
      return
    self._lines.append(line.encode())
    if time.monotonic() - self._last >= self.min_interval:
      self.flush()

  def flush(self) -> None:
    if self._remote:
      write_atomic(self.path, b"".join(self._lines))
      self._last = time.monotonic()

  def close(self) -> None:
    if self._remote:
      self.flush()
    else:
      self._file.close()


# ----------------------------------------------------------------------------- range reads


class BlockCache:
  """Fixed-size blocks of remote files, least recently used dropped past `max_bytes`."""

  def __init__(self, max_bytes: int, block_bytes: int = 1 << 16):
    self.max_bytes, self.block_bytes = max_bytes, block_bytes
    self._blocks: collections.OrderedDict[tuple[str, int], bytes] = collections.OrderedDict()
    self._bytes = 0
    self._lock = threading.Lock()
    self.fetches = 0  # ranged GETs issued (a benchmark and test figure)

  def get(self, key: tuple[str, int]) -> bytes | None:
    with self._lock:
      block = self._blocks.get(key)
      if block is not None:
        self._blocks.move_to_end(key)
      return block

  def put(self, key: tuple[str, int], block: bytes) -> None:
    with self._lock:
      if key in self._blocks:
        return
      self._blocks[key] = block
      self._bytes += len(block)
      while self._bytes > self.max_bytes and len(self._blocks) > 1:
        _, old = self._blocks.popitem(last=False)
        self._bytes -= len(old)

  @property
  def size_bytes(self) -> int:
    return self._bytes


CACHE = BlockCache(int(float(os.environ.get("LMJAX_REMOTE_CACHE_MB", "256")) * 2**20))


class RangeFile:
  """Byte ranges of one remote file, through `CACHE`: a read fetches only the blocks it
  spans (never the whole file), and `prefetch` fetches many spans' blocks concurrently."""

  def __init__(self, url: str, size: int, cache: BlockCache | None = None):
    self.url, self.size, self.cache = url, size, cache or CACHE
    self._fs, self._path = filesystem(url)

  def _blocks(self, spans: Iterable[tuple[int, int]]) -> list[int]:
    b = self.cache.block_bytes
    return sorted({i for lo, hi in spans if hi > lo for i in range(lo // b, (hi - 1) // b + 1)})

  def prefetch(self, spans: Iterable[tuple[int, int]]) -> None:
    """Fetches the missing blocks of byte spans [lo, hi) in one concurrent batch."""
    b = self.cache.block_bytes
    missing = [i for i in self._blocks(spans) if self.cache.get((self.url, i)) is None]
    if not missing:
      return
    starts = [i * b for i in missing]
    ends = [min(self.size, (i + 1) * b) for i in missing]
    data = self._fs.cat_ranges([self._path] * len(missing), starts, ends)
    self.cache.fetches += len(missing)
    for i, block in zip(missing, data):
      if isinstance(block, Exception):
        raise UserError(describe(self.url, block))
      self.cache.put((self.url, i), block)

  def read(self, lo: int, hi: int) -> bytes:
    """Bytes [lo, hi)."""
    b = self.cache.block_bytes
    parts = []
    for i in self._blocks([(lo, hi)]):
      block = self.cache.get((self.url, i))
      if block is None:
        self.prefetch([(i * b, min(self.size, (i + 1) * b))])
        block = self.cache.get((self.url, i))
        if block is None:  # a cache smaller than one block: read around it
          block = self._fs.cat_file(self._path, i * b, min(self.size, (i + 1) * b))
      parts.append(block[max(lo - i * b, 0):min(hi - i * b, len(block))])
    return b"".join(parts)
