"""Writing checkpoints atomically: a temp file in the destination folder, fsync, rename."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import CheckpointError

if TYPE_CHECKING:
    import torch


def refuse_overwriting_source(out: Path, sources: list[Path]) -> None:
    """The output may never be (or be inside) a source: checked before any work."""
    out = out.resolve()
    for src in sources:
        src = Path(src).resolve()
        if out == src or (src.is_dir() and out.is_relative_to(src)):
            raise CheckpointError(f"{out}: refusing to write over the source {src}", code="CKM530")


def save(tensors: Mapping[str, torch.Tensor], out: Path, metadata: dict[str, str]) -> None:
    """Write `tensors` to `out` (.safetensors, or a torch file for .pt/.pth/.bin), atomically."""
    import torch

    out = Path(out)
    folder = out.parent if str(out.parent) else Path(".")
    if not folder.is_dir():
        raise CheckpointError(f"{out}: the folder {folder} does not exist", code="CKM531")
    tmp = folder / f".{out.name}.ckptmap-partial-{os.getpid()}"
    try:
        if out.suffix == ".safetensors":
            from safetensors.torch import save_file

            save_file(_unshared(tensors), str(tmp), metadata=metadata)
        else:
            torch.save(dict(tensors), tmp)
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, out)
        dir_fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise CheckpointError(f"{out}: cannot write ({e.strerror})", code="CKM532") from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _unshared(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """safetensors refuses tensors that share memory: give each its own contiguous copy."""
    seen: set[tuple[int, int]] = set()
    out = {}
    for name, t in tensors.items():
        ident = (t.untyped_storage().data_ptr(), t.storage_offset())
        shared = t.numel() > 0 and ident in seen
        seen.add(ident)
        out[name] = t.clone().contiguous() if shared or not t.is_contiguous() else t
    return out


def provenance(
    rules_fingerprint: str, plan_fingerprint: str, sources: list[Path]
) -> dict[str, str]:
    from ..version import __version__

    identity = [{"name": Path(s).name, "bytes": Path(s).stat().st_size} for s in sources]
    return {
        "ckptmap.version": __version__,
        "ckptmap.rules_fingerprint": rules_fingerprint,
        "ckptmap.plan_fingerprint": plan_fingerprint,
        "ckptmap.source": json.dumps(identity),
    }


def write_text_atomically(path: Path, text: str) -> None:
    """Replace a text file (a rule file, a report) with no moment where it is half written."""
    path = Path(path)
    tmp = path.parent / f".{path.name}.ckptmap-partial-{os.getpid()}"
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise CheckpointError(f"{path}: cannot write ({e.strerror})", code="CKM532") from None
