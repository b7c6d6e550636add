"""Checkpoint files: one interface over every format.

`open_checkpoint(path)` returns a `Checkpoint` that describes its tensors
(names, shapes, dtypes) without reading their data, and hands out tensors one
at a time on demand.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import CheckpointError
from .base import Checkpoint
from .safetensors import SafetensorsCheckpoint
from .torchfile import TorchCheckpoint

__all__ = ["Checkpoint", "open_checkpoint"]


def open_checkpoint(path: str | Path, select: str | None = None) -> Checkpoint:
    """Open a checkpoint file by its format (safetensors, or a torch pickle)."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or directory", code="CKM501")
    if path.is_dir():
        raise CheckpointError(f"{path}: is a directory, not a checkpoint file", code="CKM502")
    with open(path, "rb") as f:
        head = f.read(8)
    if path.suffix == ".safetensors" or (
        len(head) == 8
        and not head.startswith(b"PK")
        and path.suffix not in (".pt", ".pth", ".bin", ".ckpt")
    ):
        return SafetensorsCheckpoint(path)
    return TorchCheckpoint(path, select=select)
