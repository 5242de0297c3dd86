"""A safetensors header read from a file's first bytes (service/models/weights_header.py),
checked against what safetensors itself writes."""

from __future__ import annotations

import io
import json

import pytest
import torch
from safetensors.torch import save

from service.models.weights_header import NotSafetensors, Tensor, read_header


def header_of(data: bytes) -> dict[str, Tensor]:
    return read_header(io.BytesIO(data).read, len(data))


def test_the_tensors_safetensors_writes_are_read_back():
    data = save({"a.weight": torch.zeros(4, 3), "b": torch.ones(2, dtype=torch.bfloat16)})
    assert header_of(data) == {"a.weight": Tensor("F32", (4, 3)), "b": Tensor("BF16", (2,))}


def rewritten(header: dict, data_bytes: int) -> bytes:
    raw = json.dumps(header).encode()
    return len(raw).to_bytes(8, "little") + raw + b"\0" * data_bytes


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"\0" * 4096, "its header would be 0 bytes"),
        ((2**40).to_bytes(8, "little") + b"{}", "its header would be"),
        (rewritten({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, 9),
         "its tensors take 8 bytes, but 9 follow the header"),
        (rewritten({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 4]}}, 4),
         "offsets do not match"),
        (rewritten({"a": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}, 8), "gaps"),
        (rewritten({"a": {"dtype": "Q4", "shape": [1], "data_offsets": [0, 1]}}, 1), "dtype"),
        (rewritten([1, 2], 0), "not a JSON object"),
    ],
)  # fmt: skip
def test_anything_else_is_refused_with_the_reason(data: bytes, reason: str):
    with pytest.raises(NotSafetensors, match=reason):
        header_of(data)


def test_a_file_cut_inside_its_header_is_refused():
    with pytest.raises(NotSafetensors, match="it ends inside its header"):
        read_header(io.BytesIO(b"\x05\0\0\0\0\0\0\0{").read, 100)
