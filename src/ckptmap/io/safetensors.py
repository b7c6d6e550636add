"""safetensors files: the header is read on its own, tensors lazily through safe_open."""

from __future__ import annotations

import json
import struct
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import CheckpointError
from .base import Checkpoint

if TYPE_CHECKING:
    import torch

    from ..plan import TensorMeta

DTYPES = {
    "F64": "float64",
    "F32": "float32",
    "F16": "float16",
    "BF16": "bfloat16",
    "I64": "int64",
    "I32": "int32",
    "I16": "int16",
    "I8": "int8",
    "U8": "uint8",
    "U16": "uint16",
    "U32": "uint32",
    "U64": "uint64",
    "BOOL": "bool",
    "F8_E4M3": "float8_e4m3fn",
    "F8_E5M2": "float8_e5m2",
}


class SafetensorsCheckpoint(Checkpoint):
    def __init__(self, path: Path):
        super().__init__(path)
        self._handle = None

    @cached_property
    def header(self) -> dict:
        try:
            with open(self.path, "rb") as f:
                raw = f.read(8)
                if len(raw) < 8:
                    raise CheckpointError(
                        f"{self.path}: too short to be safetensors", code="CKM510"
                    )
                (n,) = struct.unpack("<Q", raw)
                body = f.read(n)
        except OSError as e:
            raise CheckpointError(
                f"{self.path}: cannot read ({e.strerror})", code="CKM501"
            ) from None
        if len(body) < n:
            raise CheckpointError(f"{self.path}: header cut short", code="CKM510")
        try:
            header = json.loads(body)
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{self.path}: header is not JSON ({e})", code="CKM511") from None
        if not isinstance(header, dict):
            raise CheckpointError(f"{self.path}: header is not a JSON object", code="CKM511")
        return header

    def meta(self) -> dict[str, TensorMeta]:
        from ..plan import TensorMeta

        out = {}
        for name, info in self.header.items():
            if name == "__metadata__":
                continue
            try:
                out[name] = TensorMeta(
                    tuple(int(d) for d in info["shape"]), DTYPES.get(info["dtype"], info["dtype"])
                )
            except (KeyError, TypeError, ValueError):
                raise CheckpointError(
                    f"{self.path}: malformed header entry for {name!r}", code="CKM511"
                ) from None
        return out

    def get(self, name: str) -> torch.Tensor:
        from safetensors import safe_open

        if self._handle is None:
            try:
                self._handle = safe_open(str(self.path), framework="pt")
            except Exception as e:  # safetensors raises its own error types
                raise CheckpointError(
                    f"{self.path}: not a valid safetensors file ({e})", code="CKM512"
                ) from None
        return self._handle.get_tensor(name)
