"""Safetensors files, whole or sharded (`model.safetensors.index.json`), read and written
with numpy alone: no torch, no pickle.

The reader parses the format itself (an 8-byte header length, a JSON header, raw
little-endian bytes) so that bfloat16 checkpoints, which `safetensors.numpy` cannot
represent, read through `ml_dtypes.bfloat16`. The writer cuts shards the way
`save_pretrained` does once the weights pass `max_shard_bytes`.
"""

from __future__ import annotations

import json
import os
import struct

import ml_dtypes
import numpy as np

from lmjax.errors import UserError

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
MAX_SHARD_BYTES = 5 * 1024 ** 3  # transformers' long-standing default shard size
DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
          "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8,
          "BOOL": np.bool_}


def read_file(path: str) -> dict[str, np.ndarray]:
  """One safetensors file -> {name: array} (memory-mapped, read-only)."""
  with open(path, "rb") as f:
    (size,) = struct.unpack("<Q", f.read(8))
    if size > os.path.getsize(path) - 8:
      raise ValueError(f"header of {size} bytes is longer than the file")
    header = json.loads(f.read(size))
  header.pop("__metadata__", None)
  data = np.memmap(path, np.uint8, mode="r", offset=8 + size) if header else None
  out = {}
  for name, info in header.items():
    if info["dtype"] not in DTYPES:
      raise ValueError(f"tensor {name} has dtype {info['dtype']}, which lmjax does not read")
    begin, end = info["data_offsets"]
    out[name] = data[begin:end].view(DTYPES[info["dtype"]]).reshape(info["shape"])
  return out


def read_safetensors(directory: str) -> dict[str, np.ndarray]:
  """Every tensor of a Hugging Face directory, from its shards (listed by the index) or
  its one model.safetensors."""
  index = os.path.join(directory, INDEX)
  if os.path.isfile(index):
    try:
      with open(index) as f:
        files = sorted(set(json.load(f)["weight_map"].values()))
    except (ValueError, KeyError, AttributeError) as e:
      raise UserError(f"{index} is not a safetensors index ({type(e).__name__})") from None
  elif os.path.isfile(os.path.join(directory, SINGLE)):
    files = [SINGLE]
  else:
    raise UserError(f"{directory} has no model.safetensors (only safetensors weights are "
                    "imported, never pickle files such as pytorch_model.bin)")
  tensors: dict[str, np.ndarray] = {}
  for name in files:
    try:
      tensors.update(read_file(os.path.join(directory, name)))
    except (OSError, ValueError, KeyError, TypeError, struct.error) as e:
      detail = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
      raise UserError(f"cannot read {directory}/{name}: {detail}") from None
  return tensors


def write_safetensors(tensors: dict[str, np.ndarray], directory: str,
                      max_shard_bytes: int = MAX_SHARD_BYTES) -> list[str]:
  """Writes `tensors` as model.safetensors, or, past `max_shard_bytes`, as shards
  model-0000i-of-0000n.safetensors (in the given order) with their index; returns the
  files written."""
  from safetensors.numpy import save_file
  shards: list[dict[str, np.ndarray]] = [{}]
  size = 0
  for name, value in tensors.items():
    if shards[-1] and size + value.nbytes > max_shard_bytes:
      shards.append({})
      size = 0
    shards[-1][name] = value
    size += value.nbytes
  if len(shards) == 1:
    save_file(tensors, os.path.join(directory, SINGLE), metadata={"format": "pt"})
    return [SINGLE]
  names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
  for name, shard in zip(names, shards):
    save_file(shard, os.path.join(directory, name), metadata={"format": "pt"})
  index = {"metadata": {"total_size": sum(v.nbytes for v in tensors.values())},
           "weight_map": {k: name for name, shard in zip(names, shards) for k in shard}}
  with open(os.path.join(directory, INDEX), "w") as f:
    json.dump(index, f, indent=2)
  return names + [INDEX]
