"""Opening one checkpoint file, its format told by its bytes, not its name."""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import CheckpointError
from .base import Checkpoint
from .safetensors import SafetensorsCheckpoint
from .torchfile import TorchCheckpoint


def refuse_special(path: Path, error: type = CheckpointError) -> None:
    """A FIFO, socket or device is refused before it is opened: reading one could wait
    forever or never end."""
    import stat

    try:
        mode = os.stat(path).st_mode
    except OSError:
        return  # the open that follows says what is wrong
    if not stat.S_ISREG(mode) and not stat.S_ISDIR(mode):
        raise error(
            f"{path}: not a regular file (a pipe, socket or device); refused", code="CKM504"
        )


def open_file(path: Path, select: str | None = None) -> Checkpoint:
    refuse_special(path, CheckpointError)
    try:
        with open(path, "rb") as f:
            head = f.read(9)
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read ({e.strerror})", code="CKM501") from None
    # safetensors first: its 8-byte header length can begin with 0x80, like a pickle
    if len(head) >= 9 and head[8:9] == b"{":
        if select:
            raise CheckpointError(f"{path}: --select is for torch checkpoints", code="CKM523")
        return SafetensorsCheckpoint(path)
    if head.startswith(b"PK\x03\x04") or head[:1] == b"\x80":  # zip, or a legacy pickle
        return TorchCheckpoint(path, select=select)
    if path.suffix == ".safetensors":
        return SafetensorsCheckpoint(path)  # its header check will say what is wrong
    raise CheckpointError(
        f"{path}: neither a safetensors file nor a torch checkpoint", code="CKM503"
    )
