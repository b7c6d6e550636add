"""The interface every checkpoint reader implements."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

    from ..meta import Described, TensorMeta
    from .safetensors import RawBytes


class Checkpoint:
    """A checkpoint on disk: metadata without data, tensors on demand.

    `meta()` reads names, shapes and dtypes only (headers, where the format has
    them); `get(name)` reads one tensor. `notes` says what the file holds
    besides tensors; `files` are the files it is made of.
    """

    def __init__(self, path: Path):
        self.path = path
        self.notes: list[str] = []

    @property
    def files(self) -> list[Path]:
        return [self.path]

    @property
    def metadata(self) -> dict[str, str]:
        """What the file says about itself besides tensors (provenance, format notes)."""
        return {}

    def meta(self) -> dict[str, TensorMeta]:
        raise NotImplementedError

    def get(self, name: str) -> torch.Tensor:
        raise NotImplementedError

    def done(self, name: str) -> None:
        """The caller no longer needs this tensor (a reader may free what it holds)."""

    def raw(self, name: str) -> RawBytes | None:
        """Where a tensor's bytes lie, when they can be copied as they are (safetensors)."""
        return None

    def ties(self) -> dict[str, tuple[str, ...]]:
        """Names whose tensors are one tensor stored once (tied weights), grouped."""
        return {}

    def describe(self) -> Described:
        from ..meta import Described

        return Described(self.meta(), self.ties())

    def tensors(self) -> Mapping[str, torch.Tensor]:
        """A read-only mapping that reads each tensor when it is looked up."""
        return LazyTensors(self)


class LazyTensors(Mapping):
    def __init__(self, checkpoint: Checkpoint):
        self._checkpoint = checkpoint
        self._meta = checkpoint.meta()

    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in self._meta:
            raise KeyError(name)
        return self._checkpoint.get(name)

    def __iter__(self) -> Iterator[str]:
        return iter(self._meta)

    def __len__(self) -> int:
        return len(self._meta)
