"""torch pickles (.pt/.pth/.bin): always weights_only=True, mmap where the format allows."""

from __future__ import annotations

import pickle
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import CheckpointError
from .base import Checkpoint

if TYPE_CHECKING:
    import torch

    from ..plan import TensorMeta

# keys that training scripts nest the weights under, most specific first
NESTED = (
    "state_dict",
    "model_state_dict",
    "model",
    "module",
    "ema",
    "state_dict_ema",
    "model_ema",
    "params",
    "weights",
)


class TorchCheckpoint(Checkpoint):
    def __init__(self, path: Path, select: str | None = None):
        super().__init__(path)
        self.select = select

    @cached_property
    def state(self) -> dict[str, torch.Tensor]:
        try:
            obj = self._load(mmap=True)
        except CheckpointError as e:
            if "mmap" not in e.message:
                raise
            obj = self._load(mmap=False)  # legacy (non-zip) files cannot be mapped
        return _pick_state_dict(obj, self.select, self.path)

    def _load(self, mmap: bool) -> Any:
        import torch

        try:
            return torch.load(self.path, map_location="cpu", weights_only=True, mmap=mmap)
        except pickle.UnpicklingError as e:
            lines = str(e).splitlines()
            why = next((ln.strip() for ln in lines if "GLOBAL" in ln or "global" in ln), lines[0])
            raise CheckpointError(
                f"{self.path}: refused: the pickle is not weights-only ({why}); nothing was run",
                code="CKM521",
            ) from None
        except Exception as e:
            raise CheckpointError(f"{self.path}: cannot load ({e})", code="CKM520") from None

    def meta(self) -> dict[str, TensorMeta]:
        from ..plan import TensorMeta, dtype_name

        return {k: TensorMeta(tuple(t.shape), dtype_name(t.dtype)) for k, t in self.state.items()}

    def get(self, name: str) -> torch.Tensor:
        return self.state[name]


def _pick_state_dict(obj: Any, select: str | None, path: Path) -> dict[str, torch.Tensor]:
    import torch

    if select:
        for part in select.split("."):
            if not isinstance(obj, dict) or part not in obj:
                raise CheckpointError(f"{path}: no {select!r} in the checkpoint", code="CKM523")
            obj = obj[part]
    if not isinstance(obj, dict):
        raise CheckpointError(
            f"{path}: holds a {type(obj).__name__}, not a state_dict", code="CKM523"
        )
    if obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return obj
    candidates = [
        k
        for k in NESTED
        if isinstance(obj.get(k), dict)
        and any(isinstance(v, torch.Tensor) for v in obj[k].values())
    ]
    if len(candidates) == 1 and not select:
        return {k: v for k, v in obj[candidates[0]].items() if isinstance(v, torch.Tensor)}
    if len(candidates) > 1:
        raise CheckpointError(
            f"{path}: several state_dicts inside ({', '.join(candidates)}); choose one with select",
            code="CKM524",
        )
    return {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
