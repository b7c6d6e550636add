"""Checkpoint files: one interface over every format.

`open_checkpoint(path)` returns a `Checkpoint` that describes its tensors
(names, shapes, dtypes) without reading their data, and hands out tensors one
at a time on demand. Formats are told by their bytes, not their names.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..errors import CheckpointError, UsageError
from ..meta import Described, TensorMeta, meta_of, ties_of
from .base import Checkpoint
from .dcp import is_dcp
from .files import open_file, refuse_special
from .sharded import INDEX_NAMES, SINGLE_NAMES, ShardedCheckpoint

__all__ = ["Checkpoint", "describe", "open_checkpoint", "refuse_special"]


def open_checkpoint(path: str | Path, select: str | None = None) -> Checkpoint:
    """Open a checkpoint: a safetensors or torch file, or a (sharded) model folder.

    `select` picks nested weights in a training checkpoint (`"model"`, `"ema.module"`).
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or directory", code="CKM501")
    if path.is_dir():
        if is_dcp(path):  # torch.distributed.checkpoint: `.metadata` and `__N_M.distcp`
            if select:
                raise CheckpointError(f"{path}: --select is for torch checkpoints", code="CKM523")
            from .dcp import DcpCheckpoint  # torch.distributed loads on first use

            return DcpCheckpoint(path)
        for name in INDEX_NAMES:
            if (path / name).is_file():
                return ShardedCheckpoint(path / name)
        for name in SINGLE_NAMES:
            if (path / name).is_file():
                return open_file(path / name, select)
        present = ", ".join(sorted(p.name for p in path.iterdir())[:8]) or "nothing"
        raise CheckpointError(
            f"{path}: a folder with no {INDEX_NAMES[0]} (or {INDEX_NAMES[1]}) and no single "
            f"model file; it holds {present}",
            code="CKM502",
        )
    return open_file(path, select)


def describe(obj: Any, role: str = "source") -> Described:
    """Metadata of a state_dict, `{name: shape}`, nn.Module or checkpoint path (no tensor data)."""
    if isinstance(obj, Described):
        return obj
    if isinstance(obj, Checkpoint):
        return obj.describe()
    if isinstance(obj, (str, Path)):
        return open_checkpoint(obj).describe()
    # Only what torch made can be a module or a tensor: no need to import it (seconds) otherwise.
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(obj, torch.nn.Module):
        state = obj.state_dict(keep_vars=True)  # the live tensors: nothing is copied
        params = frozenset(n for n, _ in obj.named_parameters(remove_duplicate=False))
        return Described(meta_of(state, role), ties_of(state), params)
    if isinstance(obj, Mapping):
        if torch is None or set(map(type, obj.values())) <= {TensorMeta, tuple, list}:
            return Described(meta_of(obj, role))  # shapes only: nothing can be tied
        tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
        return Described(meta_of(obj, role), ties_of(tensors))
    raise UsageError(
        f"{role} must be a state_dict, a {{name: shape}} mapping, an nn.Module or a checkpoint "
        f"path, not {type(obj).__name__}"
    )
