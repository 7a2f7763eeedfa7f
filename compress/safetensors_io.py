"""Copying tensors between safetensors files without loading them: the format is an 8-byte
header length, a JSON header of dtype/shape/byte offsets, then raw bytes, so tensors can be
streamed from file to file in chunks (a 671 MB embedding costs no memory). The source side is
`llmprune.reader`'s entries (headers parsed and checked there); this module only writes."""

from __future__ import annotations

import json
import struct
from collections.abc import Iterable
from pathlib import Path

from llmprune.reader import TensorEntry, read_bytes, row_ranges


def copy_tensors(entries: Iterable[TensorEntry], dst: Path) -> int:
    """Write the given stored tensors into one new safetensors file (in name order, their bytes
    unchanged); returns the number of data bytes written."""
    header, offset, plan = {}, 0, []
    for entry in sorted(entries, key=lambda e: e.name):
        header[entry.name] = {"dtype": entry.dtype, "shape": list(entry.shape),
                              "data_offsets": [offset, offset + entry.nbytes]}
        plan.append(entry)
        offset += entry.nbytes
    header["__metadata__"] = {"format": "pt"}
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # the data section starts 8-byte aligned
    with open(dst, "wb") as out:
        out.write(struct.pack("<Q", len(blob)))
        out.write(blob)
        for entry in plan:  # a row chunk at a time: a large tensor never sits in memory
            out.writelines(read_bytes(entry, lo, hi).numpy() for lo, hi in row_ranges(entry))
    return offset
