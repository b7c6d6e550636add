"""torch.distributed.checkpoint folders (`.metadata` and `__N_M.distcp` files), read through
DCP itself: its `FileSystemReader` and `Metadata` for names, shapes and dtypes, and
`dcp.load` for one tensor at a time (DCP reads only the chunks that tensor is made of).

Torch's distributed package loads on first use: `import ckptmap` stays free of it.
"""

from __future__ import annotations

import contextlib
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import CheckpointError
from ..meta import TensorMeta, dtype_name
from .base import Checkpoint

if TYPE_CHECKING:
    import torch

METADATA = ".metadata"


def is_dcp(folder: Path) -> bool:
    return (folder / METADATA).is_file()


@contextlib.contextmanager
def _quiet() -> Any:
    """DCP warns that no process group exists when one process reads or writes: that is
    the single-process use it documents, not the user's concern."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def tensors_in(metadata: Any) -> tuple[dict[str, TensorMeta], list[str]]:
    """A DCP `Metadata`'s tensors (names, global shapes, dtypes), and the names of its
    other entries (pickled objects)."""
    tensors: dict[str, TensorMeta] = {}
    others = []
    for fqn, entry in metadata.state_dict_metadata.items():
        size = getattr(entry, "size", None)
        properties = getattr(entry, "properties", None)
        if size is None or properties is None:  # BytesStorageMetadata: pickled objects
            others.append(fqn)
            continue
        tensors[fqn] = TensorMeta(tuple(size), dtype_name(properties.dtype))
    return tensors, others


class DcpCheckpoint(Checkpoint):
    """A DCP folder as a checkpoint: tensors by their fully qualified names."""

    def __init__(self, folder: Path):
        super().__init__(folder)
        self.folder = folder
        import torch.distributed.checkpoint as dcp

        self._dcp = dcp
        try:
            with _quiet():
                metadata = dcp.FileSystemReader(str(folder)).read_metadata()
        except Exception as e:  # DCP's own reader refused the folder: say so in one line
            raise CheckpointError(
                f"{folder}: not a readable torch.distributed.checkpoint folder "
                f"({type(e).__name__}: {str(e)[:200]})",
                code="CKM526",
            ) from None
        self._meta, others = tensors_in(metadata)
        if others:
            shown = ", ".join(sorted(others)[:5]) + (" …" if len(others) > 5 else "")
            self.notes.append(f"{len(others)} non-tensor entries left out ({shown})")
        if not self._meta:
            raise CheckpointError(f"{folder}: no tensors in the checkpoint", code="CKM523")

    @property
    def files(self) -> list[Path]:
        return sorted(p for p in self.folder.iterdir() if p.is_file())

    def meta(self) -> dict[str, TensorMeta]:
        return dict(self._meta)

    def get(self, name: str) -> torch.Tensor:
        import torch

        m = self._meta[name]
        tensor = torch.empty(m.shape, dtype=getattr(torch, m.dtype or "float32"))
        try:
            with _quiet():
                self._dcp.load(  # this process alone, even when a process group exists
                    {name: tensor},
                    storage_reader=self._dcp.FileSystemReader(str(self.folder)),
                    no_dist=True,
                )
        except Exception as e:
            raise CheckpointError(
                f"{self.folder}: {name} cannot be read ({type(e).__name__}: {str(e)[:200]})",
                code="CKM526",
            ) from None
        return tensor


def save_dcp(folder: Path, tensors: dict[str, Any]) -> None:
    """Write `tensors` as a DCP folder (one process: every tensor whole), through DCP."""
    import torch.distributed.checkpoint as dcp

    with _quiet():
        dcp.save(
            tensors,
            storage_writer=dcp.FileSystemWriter(str(folder), sync_files=True),
            no_dist=True,
        )
