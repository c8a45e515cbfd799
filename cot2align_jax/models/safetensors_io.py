"""Reading and writing the safetensors format with numpy (bfloat16 and float8 included).

Format: 8-byte little-endian header length N, N bytes of JSON
{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}, then the raw
little-endian tensor bytes. Reading memory-maps the file, so a tensor costs memory only when it
is used. No pickle is ever involved.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from typing import Mapping

import ml_dtypes
import numpy as np

from cot2align_jax.models.config import ModelError

_DTYPES = {
    "F64": np.dtype("<f8"), "F32": np.dtype("<f4"), "F16": np.dtype("<f2"),
    "BF16": np.dtype(ml_dtypes.bfloat16), "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2), "I64": np.dtype("<i8"), "I32": np.dtype("<i4"),
    "I16": np.dtype("<i2"), "I8": np.dtype("i1"), "U8": np.dtype("u1"), "BOOL": np.dtype("?"),
}
_NAMES = {v: k for k, v in _DTYPES.items()}


class SafetensorsFile:
  """Lazy, memory-mapped access to one .safetensors file."""

  def __init__(self, path: str | os.PathLike):
    self.path = Path(path)
    try:
      with open(self.path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        if n > os.path.getsize(self.path) - 8:
          raise ValueError("header length past the end of the file")
        header = json.loads(f.read(n))
    except (OSError, ValueError, struct.error) as e:
      raise ModelError(f"{self.path}: not a readable safetensors file ({e})") from None
    self.metadata = header.pop("__metadata__", {}) or {}
    self.entries = header
    self._data_start = 8 + n
    self._map = None

  def keys(self):
    return self.entries.keys()

  def get(self, name: str) -> np.ndarray:
    """One tensor as a read-only numpy array (a view into the memory map)."""
    if self._map is None:
      self._map = np.memmap(self.path, dtype=np.uint8, mode="r")
    entry = self.entries[name]
    if entry["dtype"] not in _DTYPES:
      raise ModelError(f"{self.path}: tensor {name!r} has unsupported dtype {entry['dtype']}")
    begin, end = entry["data_offsets"]
    dtype = _DTYPES[entry["dtype"]]
    shape = tuple(entry["shape"])
    if (end - begin) != dtype.itemsize * int(np.prod(shape, dtype=np.int64)):
      raise ModelError(f"{self.path}: tensor {name!r} has {end - begin} bytes for shape {shape}")
    return np.frombuffer(self._map, dtype=dtype, count=int(np.prod(shape, dtype=np.int64)),
                         offset=self._data_start + begin).reshape(shape)


def save_file(tensors: Mapping[str, np.ndarray], path: str | os.PathLike,
              metadata: Mapping[str, str] | None = None) -> None:
  """Writes tensors to `path` (the caller makes it atomic by writing to a temporary name)."""
  header: dict = {"__metadata__": dict(metadata or {"format": "pt"})}
  offset = 0
  arrays = []
  for name in sorted(tensors):
    a = np.asarray(tensors[name], order="C")
    if a.dtype not in _NAMES:
      raise ModelError(f"cannot store tensor {name!r} of dtype {a.dtype} in safetensors")
    header[name] = {"dtype": _NAMES[a.dtype], "shape": list(a.shape),
                    "data_offsets": [offset, offset + a.nbytes]}
    offset += a.nbytes
    arrays.append(a)
  blob = json.dumps(header, separators=(",", ":")).encode()
  blob += b" " * (-len(blob) % 8)
  with open(path, "wb") as f:
    f.write(struct.pack("<Q", len(blob)))
    f.write(blob)
    for a in arrays:
      f.write(a.tobytes())
