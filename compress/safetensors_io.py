"""Copying tensors between safetensors files without loading them: the format is an 8-byte
header length, a JSON header of dtype/shape/byte offsets, then raw bytes, so tensors can be
streamed from file to file in chunks (a 671 MB embedding costs no memory)."""

from __future__ import annotations

import json
import struct
from pathlib import Path

from llmprune.meta_init import read_header

CHUNK = 16 * 1024 * 1024


def copy_tensors(sources: dict[str, Path], dst: Path) -> int:
    """Write the named tensors (name -> source file) into one new safetensors file; returns the
    number of data bytes written."""
    entries, offset, plan = {}, 0, []
    headers: dict[Path, tuple[dict, int]] = {}
    for name in sorted(sources):
        src = sources[name]
        if src not in headers:
            headers[src] = read_header(src)
        header, data_start = headers[src]
        info = header[name]
        begin, end = info["data_offsets"]
        size = end - begin
        entries[name] = {"dtype": info["dtype"], "shape": info["shape"], "data_offsets": [offset, offset + size]}
        plan.append((src, data_start + begin, size))
        offset += size
    entries["__metadata__"] = {"format": "pt"}
    blob = json.dumps(entries, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # the data section starts 8-byte aligned
    with open(dst, "wb") as out:
        out.write(struct.pack("<Q", len(blob)))
        out.write(blob)
        for src, start, size in plan:
            with open(src, "rb") as f:
                f.seek(start)
                left = size
                while left:
                    chunk = f.read(min(CHUNK, left))
                    out.write(chunk)
                    left -= len(chunk)
    return offset
