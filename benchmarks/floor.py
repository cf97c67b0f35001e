"""The I/O floor: read every input tensor once and write an output of a given size, nothing else.

A plain script with the same start-up as ``lorakit run`` (Python with torch imported): for each
safetensors file it parses the header, reads each tensor's bytes with ``readinto`` into one reused
buffer and wraps them as a torch tensor, and streams those bytes to the output file until it
holds the requested size. It then fsyncs the output, as ``lorakit run`` does. No merge, no
hashing, no provenance, no temporary folder.

Usage::

    python -m benchmarks.floor OUTPUT BYTES INPUT.safetensors [INPUT.safetensors ...]
"""

from __future__ import annotations

import argparse
import json
import os
import struct
from pathlib import Path

import torch

__all__ = ["copy_floor"]

_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16, "F64": torch.float64}


def copy_floor(inputs: list[Path], output: Path, size: int) -> int:
    """Read every tensor of ``inputs`` once and write ``size`` bytes to ``output``; return the bytes read.

    Output bytes are the input bytes in read order, then zeros when the inputs are smaller.
    """
    buffer = bytearray()
    read = 0
    remaining = size
    descriptor = os.open(output, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        for path in inputs:
            with open(path, "rb", buffering=0) as handle:
                (length,) = struct.unpack("<Q", handle.read(8))
                header = json.loads(handle.read(length))
                entries = sorted(
                    (entry["data_offsets"], entry["dtype"]) for key, entry in header.items() if key != "__metadata__"
                )
                for (start, stop), dtype in entries:
                    count = stop - start
                    if len(buffer) < count:
                        buffer = bytearray(count)
                    view = memoryview(buffer)[:count]
                    handle.seek(8 + length + start)
                    handle.readinto(view)
                    tensor = torch.frombuffer(view, dtype=_DTYPES[dtype])
                    read += tensor.numel() * tensor.element_size()
                    if remaining:
                        chunk = view[: min(count, remaining)]
                        remaining -= os.write(descriptor, chunk)
        zeros = bytes(min(remaining, 2**24))
        while remaining:
            remaining -= os.write(descriptor, zeros[: min(remaining, len(zeros))])
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
    return read


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("output", type=Path, help="File to write.")
    parser.add_argument("size", type=int, help="Bytes to write.")
    parser.add_argument("inputs", type=Path, nargs="+", help="safetensors files to read.")
    arguments = parser.parse_args()
    copy_floor(arguments.inputs, arguments.output, arguments.size)


if __name__ == "__main__":
    main()
