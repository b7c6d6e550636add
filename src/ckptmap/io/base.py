"""The interface every checkpoint reader implements."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from ..meta import Described

if TYPE_CHECKING:
    import torch

    from ..meta import Described, TensorMeta
    from .safetensors import RawBytes


class Checkpoint(ABC):
    """A checkpoint on disk: metadata without data, tensors on demand. Every reader
    (safetensors, sharded folder, torch file) implements it; callers never probe.

    The calls, in the order a plan and its execution make them:
      `meta()`      names, shapes and dtypes only (headers, where the format has them);
      `ties()`      names stored once for several (tied weights), grouped; `aliases` the
                    same as {alias: stored name};
      `describe()`  both, as the planner takes them; `metadata` what the file says of itself;
      `raw(name)`   where a tensor's bytes lie, when they can be copied undecoded (else None);
      `get(name)`   one tensor, read now; `done(name)` the caller no longer needs it.
    `notes` says what the file holds besides tensors; `files` the files it is made of.
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

    @abstractmethod
    def meta(self) -> dict[str, TensorMeta]: ...

    @abstractmethod
    def get(self, name: str) -> torch.Tensor: ...

    @property
    def aliases(self) -> dict[str, str]:
        """Tied names stored once: {alias: the stored name}."""
        return {}

    def done(self, name: str) -> None:  # noqa: B027 (optional: most readers hold nothing)
        """The caller no longer needs this tensor (a reader may free what it holds)."""

    def raw(self, name: str) -> RawBytes | None:
        """Where a tensor's bytes lie, when they can be copied as they are (safetensors)."""
        return None

    def ties(self) -> dict[str, tuple[str, ...]]:
        """Names whose tensors are one tensor stored once (tied weights), grouped."""
        return {}

    def describe(self) -> Described:
        from ..alloc import no_gc

        with no_gc():  # a header's worth of small objects, none of them garbage
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
