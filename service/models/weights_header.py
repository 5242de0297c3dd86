"""A safetensors file's header, read from its first bytes without torch: the tensors it
declares and whether they fill the file exactly.

An import checks an adapter's weights from this header before it copies the rest of
them out of the archive (an archive that inflates to gigabytes of zeros is refused after
eight bytes), and the base model's linear layers come from the base's own headers (no
model built, no torch in the API process).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

# A header names each tensor in about 150 bytes; no adapter needs more than this.
MAX_HEADER_BYTES = 16 * 1024 * 1024
LENGTH_BYTES = 8  # the header's length, a little-endian u64, comes first
DTYPE_BYTES = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1,
    "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U64": 8, "U32": 4, "U16": 2, "U8": 1, "BOOL": 1,
}  # fmt: skip


class NotSafetensors(ValueError):
    """The bytes are not a safetensors file; the message says why."""


@dataclass(frozen=True)
class Tensor:
    dtype: str
    shape: tuple[int, ...]


def read_header(read: Callable[[int], bytes], size: int) -> dict[str, Tensor]:
    """The tensors a safetensors file of `size` bytes declares, from `read` (its first
    bytes, in order). Refused unless the tensors, one after another, fill the file."""
    length = int.from_bytes(_exactly(read, LENGTH_BYTES), "little")
    if not 2 <= length <= MAX_HEADER_BYTES or LENGTH_BYTES + length > size:
        raise NotSafetensors(f"its header would be {length} bytes")
    raw = _exactly(read, length)
    try:
        header = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise NotSafetensors("its header is not JSON") from None
    if not isinstance(header, dict):
        raise NotSafetensors("its header is not a JSON object")
    header.pop("__metadata__", None)
    tensors, spans = {}, []
    for name, entry in header.items():
        tensor, span = _entry(name, entry)
        tensors[name] = tensor
        spans.append(span)
    end = 0
    for begin, finish in sorted(spans):
        if begin != end:
            raise NotSafetensors("its tensors overlap or leave gaps")
        end = finish
    if LENGTH_BYTES + length + end != size:
        raise NotSafetensors(
            f"its tensors take {end} bytes, but {size - LENGTH_BYTES - length} follow the header"
        )
    return tensors


def _entry(name: str, entry: object) -> tuple[Tensor, tuple[int, int]]:
    if not isinstance(entry, dict):
        raise NotSafetensors(f"{name} has no dtype, shape and offsets")
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if dtype not in DTYPE_BYTES:
        raise NotSafetensors(f"{name} has an unknown dtype {dtype!r}")
    if not isinstance(shape, list) or not all(_count(d) for d in shape):
        raise NotSafetensors(f"{name} has no valid shape")
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(map(_count, offsets)):
        raise NotSafetensors(f"{name} has no valid data offsets")
    begin, end = offsets
    if end - begin != math.prod(shape) * DTYPE_BYTES[dtype]:
        raise NotSafetensors(f"{name}'s offsets do not match its shape and dtype")
    return Tensor(dtype, tuple(shape)), (begin, end)


def _count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _exactly(read: Callable[[int], bytes], size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = read(size - len(data))
        if not chunk:
            raise NotSafetensors("it ends inside its header")
        data += chunk
    return data


def file_header(path: Path) -> dict[str, Tensor]:
    with open(path, "rb") as file:
        return read_header(file.read, path.stat().st_size)
