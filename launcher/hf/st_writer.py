"""A safetensors file written one tensor at a time (never the whole state dict in memory).

Format: 8-byte little-endian header length, a JSON header {name: {dtype, shape, data_offsets}},
padded with spaces to a multiple of 8, then the tensors' bytes back to back in header order.
All shapes and dtypes are declared up front (the header comes first); write() then takes the
tensors in that order. Readable by safetensors.safe_open / load_file and by transformers.
"""
from __future__ import annotations

import json
import os
import struct

import torch

_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64",
           torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
           torch.bool: "BOOL"}


class StreamingSafetensorsWriter:
    def __init__(self, path: str, specs: list[tuple[str, torch.dtype, tuple]], metadata: dict | None = None):
        header, off = {}, 0
        self.order = []
        for name, dtype, shape in specs:
            if name in header:
                raise ValueError(f"safetensors: tensor '{name}' declared twice")
            n = torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()
            header[name] = {"dtype": _DTYPES[dtype], "shape": list(shape), "data_offsets": [off, off + n]}
            self.order.append((name, dtype, tuple(shape)))
            off += n
        if metadata:
            header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        self.path, self.total, self.i = path, off, 0
        self.f = open(path, "wb")
        self.f.write(struct.pack("<Q", len(raw)))
        self.f.write(raw)

    def write(self, name: str, t: torch.Tensor) -> None:
        want, dtype, shape = self.order[self.i]
        if name != want or t.dtype != dtype or tuple(t.shape) != shape:
            raise ValueError(f"safetensors: expected '{want}' {dtype} {shape}, got '{name}' {t.dtype} {tuple(t.shape)}")
        t = t.detach().cpu().contiguous()
        self.f.write(memoryview(t.reshape(-1).view(torch.uint8).numpy()))
        self.i += 1

    def close(self) -> None:
        if self.i != len(self.order):
            self.f.close()
            raise ValueError(f"safetensors: {len(self.order) - self.i} declared tensors were not written")
        self.f.flush()
        os.fsync(self.f.fileno())
        self.f.close()

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            self.close()
        else:
            self.f.close()
