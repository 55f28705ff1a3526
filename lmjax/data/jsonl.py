"""JSON lines: one JSON object a line, UTF-8, a leading byte-order mark dropped.

`read_json_lines` is the one reader of the JSON-lines files lmjax takes records
from (chat and preference files, labelled task files, QA files); each failure is
one line naming `path:line`. The corpus readers (`lmjax.data.readers`), which
stream large and compressed files by bytes, apply the same rule through
`strip_bom` and `parse_object`. Windows tools (Notepad, PowerShell's
`Out-File -Encoding utf8`, Excel's CSV-to-UTF-8) start a file with a BOM;
`json.loads` refuses one, so it is dropped from the first line.
"""

from __future__ import annotations

import json
from typing import Any, Iterable, Iterator

from lmjax import paths
from lmjax.errors import UserError

BOM = b"\xef\xbb\xbf"  # UTF-8's byte-order mark
_BOM_TEXT = BOM.decode("utf-8")


def read_json_lines(path: str, what: str = "task") -> Iterator[tuple[str, dict[str, Any]]]:
  """(`path:line`, object) of each non-empty line of a JSON-lines file (local or in a
  bucket); `what` names the file in the one-line errors."""
  _check(path, what)
  try:
    f = paths.open_file(path, "rb")
  except OSError as e:
    raise UserError(f"{what} file is not readable: {path} ({e.strerror or e})") from None
  with f:
    yield from json_records(path, f)


def json_records(path: str, lines: Iterable[bytes | str]
                 ) -> Iterator[tuple[str, dict[str, Any]]]:
  """(`path:line`, object) of each non-empty line of `lines` (bytes, or text already
  decoded), numbered from 1."""
  for lineno, line in enumerate(lines, 1):
    where = f"{path}:{lineno}"
    if isinstance(line, bytes):
      line = decode_line(strip_bom(line) if lineno == 1 else line, where)
    elif lineno == 1:
      line = line.removeprefix(_BOM_TEXT)
    if line.strip():
      yield where, parse_object(line, where)


def strip_bom(first_line: bytes) -> bytes:
  """A file's first line without the byte-order mark it may start with."""
  return first_line[len(BOM):] if first_line.startswith(BOM) else first_line


def decode_line(raw: bytes, where: str) -> str:
  try:
    return raw.decode("utf-8")
  except UnicodeDecodeError as e:
    raise UserError(f"{where}: invalid UTF-8 (byte {e.start}); save the file as UTF-8"
                    ) from None


def parse_object(line: str, where: str, wanted: str = "") -> dict[str, Any]:
  """One line's JSON object; one line naming `where` when it is not JSON or not an object
  (`wanted` says what the object should hold)."""
  try:
    record = json.loads(line)
  except json.JSONDecodeError as e:
    raise UserError(f"{where}: not valid JSON ({e})") from None
  if not isinstance(record, dict):
    raise UserError(f"{where}: expected a JSON object{wanted}")
  return record


def _check(path: str, what: str) -> None:
  """Fails early, with one line, on a file that is missing, a directory or empty."""
  if paths.isdir(path):
    raise UserError(f"{what} file {path} is a directory; name the .jsonl file in it")
  if not paths.isfile(path):
    raise UserError(f"{what} file not found: {path}")
  if paths.getsize(path) == 0:
    raise UserError(f"{what} file is empty: {path}")
