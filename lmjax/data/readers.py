"""Documents out of corpora as they ship, streamed: no reader holds more than one record batch.

Formats, by name: `.txt` (documents separated by blank lines), `.jsonl` (one
JSON object per line, the text in `text_field`), either compressed as `.gz` or
`.zst` (`.json.gz`/`.json.zst` are JSON lines too, as C4 and the Pile ship
them), and `.parquet` (the text column, read by row group, as FineWeb ships).
Inputs are files, directories (searched recursively) or glob patterns; each
expands in sorted order.

A leading UTF-8 byte-order mark (Windows tools write one) is dropped, as every
JSON-lines reader drops it (`lmjax.data.jsonl`). Blank and null texts are not
documents: they are skipped and counted (`ReadStats.blank_docs`).

A large file is cut into `Part`s that workers read independently: uncompressed
text at document boundaries by byte offset, parquet by row group, compressed
files whole (their streams cannot be entered in the middle).
"""

from __future__ import annotations

import dataclasses
import glob
import gzip
import io
import os
import zlib
from typing import BinaryIO, Iterator, Sequence

from absl import logging

from lmjax.data.jsonl import parse_object, strip_bom
from lmjax.errors import UserError

COMPRESSED = {".gz": "gzip", ".zst": "zstd"}
SUFFIXES = (".txt", ".jsonl", ".parquet", ".jsonl.gz", ".json.gz", ".txt.gz", ".jsonl.zst",
            ".json.zst", ".txt.zst")
# A longer line is a broken or binary file, not text; reading stops before it fills memory.
MAX_LINE_BYTES = 16 << 20


@dataclasses.dataclass
class ReadStats:
  """What a reader skipped: records whose text is empty, blank or null."""

  blank_docs: int = 0


@dataclasses.dataclass(frozen=True)
class Part:
  """A slice of one input file that one worker reads: bytes [lo, hi) of uncompressed text,
  row groups [lo, hi) of parquet, or (0, -1) for a whole compressed file."""

  path: str
  lo: int = 0
  hi: int = -1

  def describe(self) -> str:
    unit = "row groups" if self.path.endswith(".parquet") else "bytes"
    return self.path if self.hi < 0 else f"{self.path} [{unit} {self.lo}:{self.hi}]"


def expand_inputs(patterns: Sequence[str], what: str = "input") -> list[str]:
  """Files named by paths, directories and globs, each expanded in sorted order; one line
  naming the pattern when it matches nothing readable."""
  if not patterns:
    raise UserError(f"no {what} files given")
  files: list[str] = []
  for pattern in patterns:
    if os.path.isdir(pattern):
      found = sorted(os.path.join(d, f) for d, _, names in os.walk(pattern) for f in names
                     if f.endswith(SUFFIXES))
      if not found:
        raise UserError(f"{what} directory {pattern} holds no {'/'.join(SUFFIXES)} files")
    elif glob.has_magic(pattern):
      found = sorted(p for p in glob.glob(pattern, recursive=True) if os.path.isfile(p))
      if not found:
        raise UserError(f"{what} pattern {pattern} matches no files")
    else:
      found = [pattern]
    for path in found:
      check_file(path, what)
    files.extend(found)
  return files


def check_file(path: str, what: str) -> None:
  """Fails early, with one line, on a file that is missing, empty or of unknown type."""
  if not os.path.isfile(path):
    raise UserError(f"{what} file not found: {path}")
  if not path.endswith(SUFFIXES):
    raise UserError(f"{what} file {path} must end in one of {', '.join(SUFFIXES)}")
  if os.path.getsize(path) == 0:
    raise UserError(f"{what} file is empty: {path}")
  if not os.access(path, os.R_OK):
    raise UserError(f"{what} file is not readable: {path}")


# ----------------------------------------------------------------------------- parts


def plan_parts(path: str, split_bytes: int) -> list[Part]:
  """Cuts a file into parts of about `split_bytes` that start at document boundaries."""
  if path.endswith(".parquet"):
    return _parquet_parts(path, split_bytes)
  if _compression(path) or os.path.getsize(path) <= split_bytes:
    return [Part(path)]
  size = os.path.getsize(path)
  cuts = [0]
  with open(path, "rb") as f:
    for target in range(split_bytes, size, split_bytes):
      cut = _boundary(f, max(target, cuts[-1]), path.endswith(".txt"))
      if cut < size and cut > cuts[-1]:
        cuts.append(cut)
  cuts.append(size)
  if len(cuts) == 2:
    return [Part(path)]
  return [Part(path, lo, hi) for lo, hi in zip(cuts, cuts[1:])]


def _boundary(f: BinaryIO, offset: int, blank_line: bool) -> int:
  """The first document start at or after `offset`: a line start (JSON lines) or the line
  after a blank one (text)."""
  f.seek(offset - 1)
  f.readline()  # to the start of the line that holds byte `offset`, or `offset` itself
  if not blank_line:
    return f.tell()
  while True:
    raw = f.readline(MAX_LINE_BYTES + 1)
    if not raw:
      return f.tell()
    if not raw.decode("utf-8", "replace").strip():
      return f.tell()


def _parquet_parts(path: str, split_bytes: int) -> list[Part]:
  meta = _parquet_file(path).metadata
  parts, lo, size = [], 0, 0
  for rg in range(meta.num_row_groups):
    size += meta.row_group(rg).total_byte_size
    if size >= split_bytes:
      parts.append(Part(path, lo, rg + 1))
      lo, size = rg + 1, 0
  if lo < meta.num_row_groups or not parts:
    parts.append(Part(path, lo, meta.num_row_groups))
  return [Part(path)] if len(parts) == 1 else parts


# ----------------------------------------------------------------------------- reading


def read_documents(path: str | Part, bad_utf8: str = "fail", text_field: str = "text",
                   stats: ReadStats | None = None) -> Iterator[str]:
  """The non-empty documents of a file or a part of one, in order; the blank or null
  records skipped on the way are counted in `stats`."""
  part = path if isinstance(path, Part) else Part(path)
  name, stats = part.path, stats if stats is not None else ReadStats()
  if name.endswith(".parquet"):
    texts = _parquet_texts(part, text_field)
  elif _base(name) == ".txt":
    texts = _text_documents(part, bad_utf8)
  else:
    texts = _json_texts(part, bad_utf8, text_field)
  for text in texts:
    if text is not None and text.strip():
      yield text
    else:
      stats.blank_docs += 1


def _compression(path: str) -> str:
  return COMPRESSED.get(os.path.splitext(path)[1], "")


def _base(path: str) -> str:
  """.txt or .jsonl (JSON lines, however named) for a text format."""
  stem = path[:-len(os.path.splitext(path)[1])] if _compression(path) else path
  return ".txt" if stem.endswith(".txt") else ".jsonl"


def _open_binary(path: str) -> BinaryIO:
  kind = _compression(path)
  if kind == "gzip":
    return gzip.open(path, "rb")
  if kind == "zstd":
    return io.BufferedReader(_ZstdStream(path), buffer_size=1 << 20)
  return open(path, "rb")


class _ZstdStream(io.RawIOBase):
  """Decompressed bytes of a .zst file, frame after frame. Unlike zstandard's stream_reader,
  a file that ends inside a frame (a cut download) is an error, not a silent end."""

  def __init__(self, path: str):
    import zstandard
    self._zstd, self._file, self._pending = zstandard, open(path, "rb"), b""
    self._obj = self._new()

  def _new(self):
    # Long-distance frames (the Pile's) need windows above the 128 MiB default.
    return self._zstd.ZstdDecompressor(max_window_size=1 << 31).decompressobj()

  def readable(self) -> bool:
    return True

  def readinto(self, buffer) -> int:
    while not self._pending:
      chunk = self._file.read(1 << 20)
      if not chunk:
        if not self._obj.eof and self._started:
          raise self._zstd.ZstdError("the file ends inside a frame (truncated)")
        return 0
      self._started = True
      self._pending = self._obj.decompress(chunk)
      while self._obj.eof and self._obj.unused_data:  # the next frame starts in this chunk
        rest, self._obj = self._obj.unused_data, self._new()
        self._pending += self._obj.decompress(rest)
    n = min(len(buffer), len(self._pending))
    buffer[:n], self._pending = self._pending[:n], self._pending[n:]
    return n

  _started = False

  def close(self) -> None:
    self._file.close()
    super().close()


def _decompression_errors() -> tuple[type[BaseException], ...]:
  errors: tuple[type[BaseException], ...] = (gzip.BadGzipFile, EOFError, zlib.error)
  try:
    import zstandard
    errors += (zstandard.ZstdError,)
  except ImportError:
    pass
  return errors


def _lines(part: Part, bad_utf8: str) -> Iterator[tuple[str, str]]:
  """(location, text) of each line of a part; invalid UTF-8 fails or is skipped and counted.

  The location is `path:line` (line numbers count from the part's first byte when the
  part starts inside the file, which then shows as `path@offset`).
  """
  path, skipped = part.path, 0
  where = path if part.lo == 0 else f"{path}@{part.lo}"
  lineno, pos = 0, part.lo
  try:
    with _open_binary(path) as f:
      if part.lo:
        f.seek(part.lo)
      while part.hi < 0 or pos < part.hi:
        raw = f.readline(MAX_LINE_BYTES + 1)
        if not raw:
          break
        lineno, pos = lineno + 1, pos + len(raw)
        if lineno == 1 and part.lo == 0:
          raw = strip_bom(raw)
        if len(raw) > MAX_LINE_BYTES:
          raise UserError(f"{where}:{lineno}: line longer than {MAX_LINE_BYTES >> 20} MiB; is "
                          "this a text file? Split long documents into lines")
        try:
          yield f"{where}:{lineno}", raw.decode("utf-8")
        except UnicodeDecodeError as e:
          if bad_utf8 != "skip":
            raise UserError(f"{where}:{lineno}: invalid UTF-8 (byte {e.start}); fix the file or "
                            "set data.bad_utf8=skip") from None
          skipped += 1
  except _decompression_errors() as e:
    raise UserError(f"{path}: corrupt {_compression(path)} stream after line {lineno} ({e}); "
                    "download the file again") from None
  if skipped:
    logging.warning("%s: skipped %d lines of invalid UTF-8", path, skipped)


def _text_documents(part: Part, bad_utf8: str) -> Iterator[str]:
  doc: list[str] = []
  for _, line in _lines(part, bad_utf8):
    if line.strip():
      doc.append(line.rstrip("\r\n"))
    elif doc:
      yield "\n".join(doc)
      doc = []
  if doc:
    yield "\n".join(doc)


def _json_texts(part: Part, bad_utf8: str, field: str) -> Iterator[str | None]:
  """The `field` of each JSON line (None where it is null); empty lines are no records."""
  wanted = f" with a '{field}' field (set data.text_field / --text_field for another name)"
  for where, line in _lines(part, bad_utf8):
    if not line.strip():
      continue
    record = parse_object(line, where, wanted)
    if field not in record:
      raise UserError(f"{where}: expected a JSON object{wanted}")
    text = record[field]
    if text is not None and not isinstance(text, str):
      raise UserError(f"{where}: the '{field}' field must be a string or null")
    yield text


def _parquet_file(path: str):
  import pyarrow.parquet as pq
  try:
    return pq.ParquetFile(path)
  except Exception as e:  # pyarrow raises ArrowInvalid / OSError for damaged files
    raise UserError(f"{path}: not a readable parquet file ({str(e).splitlines()[0][:200]})"
                    ) from None


def _is_text(kind) -> bool:
  """string, large_string, string_view, or a dictionary of them (pandas categoricals)."""
  import pyarrow as pa
  if pa.types.is_dictionary(kind):
    return _is_text(kind.value_type)
  view = getattr(pa.types, "is_string_view", lambda k: False)
  return pa.types.is_string(kind) or pa.types.is_large_string(kind) or view(kind)


def _parquet_texts(part: Part, field: str) -> Iterator[str | None]:
  """The `field` column of each row (None where it is null)."""
  import pyarrow as pa
  pf = _parquet_file(part.path)
  schema = pf.schema_arrow
  if field not in schema.names:
    raise UserError(f"{part.path}: no column '{field}' (columns: {', '.join(schema.names)}); "
                    "set data.text_field / --text_field")
  kind = schema.field(field).type
  if not _is_text(kind):
    raise UserError(f"{part.path}: column '{field}' holds {kind}, not text")
  hi = pf.metadata.num_row_groups if part.hi < 0 else part.hi
  row = 0
  try:
    for batch in pf.iter_batches(batch_size=1024, row_groups=range(part.lo, hi),
                                 columns=[field]):
      for text in batch.column(0).to_pylist():
        row += 1
        yield text
  except (pa.ArrowException, OSError) as e:
    raise UserError(f"{part.describe()}: unreadable after row {row} "
                    f"({str(e).splitlines()[0][:200]})") from None
