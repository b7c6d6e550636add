"""The interface every checkpoint reader implements."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

    from ..plan import Described, TensorMeta


class Checkpoint:
    """A checkpoint on disk: metadata without data, tensors on demand."""

    def __init__(self, path: Path):
        self.path = path

    def meta(self) -> dict[str, TensorMeta]:
        """Name -> (shape, dtype), from headers only where the format allows."""
        raise NotImplementedError

    def get(self, name: str) -> torch.Tensor:
        """One tensor, read now."""
        raise NotImplementedError

    def describe(self) -> Described:
        from ..plan import Described

        return Described(self.meta())

    def tensors(self) -> Mapping[str, torch.Tensor]:
        """A read-only mapping that reads each tensor when it is looked up."""
        return LazyTensors(self)


class LazyTensors(Mapping):
    def __init__(self, checkpoint: Checkpoint):
        self._checkpoint = checkpoint
        self._keys = list(checkpoint.meta())

    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in self._checkpoint.meta():
            raise KeyError(name)
        return self._checkpoint.get(name)

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)
