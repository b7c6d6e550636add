"""Sharded checkpoints: a folder with `model.safetensors.index.json` (or the .bin index).

Every file the index's `weight_map` names must resolve inside the folder;
anything else is refused before a byte of it is read.
"""

from __future__ import annotations

import json
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import CheckpointError
from ..limits import check_keys
from .base import Checkpoint
from .files import open_file
from .safetensors import refuse_duplicate_keys

if TYPE_CHECKING:
    import torch

    from ..meta import TensorMeta

INDEX_NAMES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
SINGLE_NAMES = ("model.safetensors", "pytorch_model.bin")


class ShardedCheckpoint(Checkpoint):
    """Tensors spread over several files, found through an index."""

    def __init__(self, index: Path):
        super().__init__(index.parent)
        self.index = index
        self._shards: dict[Path, Checkpoint] = {}

    @cached_property
    def weight_map(self) -> dict[str, Path]:
        try:
            data = refuse_duplicate_keys(self.index.read_text(encoding="utf-8"), str(self.index))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
            why = "nested too deeply" if isinstance(e, RecursionError) else str(e)
            raise CheckpointError(
                f"{self.index}: not a readable JSON index ({why})", code="CKM513"
            ) from None
        weight_map = data.get("weight_map") if isinstance(data, dict) else None
        if not isinstance(weight_map, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()
        ):
            raise CheckpointError(f"{self.index}: no weight_map of names to files", code="CKM513")
        check_keys(weight_map, str(self.index))
        folder = self.path.resolve()
        out = {}
        for name, file in weight_map.items():
            try:
                shard = (folder / file).resolve()
                is_file = shard.is_file()
            except (OSError, ValueError):  # a NUL, a name too long for the filesystem
                raise CheckpointError(
                    f"{self.index}: {name!r} is in {file[:80]!r}, not a usable file name",
                    code="CKM515",
                ) from None
            if not shard.is_relative_to(folder) or Path(file).is_absolute():
                raise CheckpointError(
                    f"{self.index}: {name!r} points outside the folder ({file!r}); refused",
                    code="CKM514",
                )
            if not is_file:
                raise CheckpointError(
                    f"{self.index}: {name!r} is in {file!r}, which is missing", code="CKM515"
                )
            out[name] = shard
        return out

    @property
    def metadata(self) -> dict[str, str]:
        """The index's `metadata` (total_size, and a ckptmap writer's provenance)."""
        try:
            data = json.loads(self.index.read_text(encoding="utf-8")).get("metadata") or {}
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError):
            return {}
        if not isinstance(data, dict):
            return {}
        return {str(k): v if isinstance(v, str) else json.dumps(v) for k, v in data.items()}

    @property
    def files(self) -> list[Path]:
        return [self.index, *sorted(set(self.weight_map.values()))]

    def shard(self, path: Path) -> Checkpoint:
        if path not in self._shards:
            self._shards[path] = open_file(path)
        return self._shards[path]

    @cached_property
    def _located(self) -> dict[str, tuple[Path, TensorMeta]]:
        """Every name -> (its shard, its meta), tied aliases a ckptmap writer stored included."""
        out = {}
        for name, path in self.weight_map.items():
            meta = self.shard(path).meta()
            if name not in meta:
                raise CheckpointError(
                    f"{self.index}: {name!r} should be in {path.name}, which does not hold it",
                    code="CKM515",
                )
            out[name] = (path, meta[name])
        for path in sorted(set(self.weight_map.values())):
            for alias in self.shard(path).aliases:
                out.setdefault(alias, (path, self.shard(path).meta()[alias]))
        return out

    def meta(self) -> dict[str, TensorMeta]:
        return {name: meta for name, (_, meta) in self._located.items()}

    def ties(self) -> dict[str, tuple[str, ...]]:
        out: dict[str, tuple[str, ...]] = {}
        for path in sorted(set(self.weight_map.values())):
            out.update(self.shard(path).ties())
        return out

    def get(self, name: str) -> torch.Tensor:
        return self.shard(self._located[name][0]).get(name)

    def raw(self, name: str):
        return self.shard(self._located[name][0]).raw(name)
