"""torch pickles (.pt/.pth/.bin): always weights_only=True, mmap where the format allows.

A pickle that tries to run code is refused and nothing in it runs. Training
checkpoints that nest the weights (`{"epoch": 90, "model": {...}}`) are
unwrapped when one candidate is clear; otherwise `select` names it.
"""

from __future__ import annotations

import ctypes
import functools
import mmap
import pickle
import sys
import warnings
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import CheckpointError
from ..limits import check_keys
from ..meta import TensorMeta, dtype_name, ties_of
from .base import Checkpoint

if TYPE_CHECKING:
    import torch

    from ..meta import TensorMeta


class TorchCheckpoint(Checkpoint):
    def __init__(self, path: Path, select: str | None = None):
        super().__init__(path)
        self.select = select
        self.mapped = False

    @cached_property
    def state(self) -> dict[str, torch.Tensor]:
        # mapping reads each record's bytes where the zip says they lie, trusting the
        # pickle's sizes: only exact for stored (uncompressed) records of the right size
        obj = None
        if _mapping_is_exact(self.path):
            try:
                obj = self._load(mmap=True)
                self.mapped = True
            except CheckpointError as e:
                if "mmap" not in e.message:
                    raise
        if obj is None:  # legacy (non-zip) or compressed files: read and checked by torch
            obj = self._load(mmap=False)
        state, self.notes = pick_state_dict(obj, self.select, self.path)
        return state

    def _load(self, mmap: bool) -> Any:
        import torch

        try:
            with warnings.catch_warnings():  # torch's multi-line notes would bury our one line
                warnings.simplefilter("ignore")
                return torch.load(self.path, map_location="cpu", weights_only=True, mmap=mmap)
        except pickle.UnpicklingError as e:
            lines = str(e).splitlines()
            why = next((ln.strip() for ln in lines if "GLOBAL" in ln or "global" in ln), lines[0])
            why = why.split(". ")[0][:300]  # torch's advice to load unsafely is not ours to give
            raise CheckpointError(
                f"{self.path}: refused: the pickle is not weights-only ({why}); nothing was run",
                code="CKM521",
            ) from None
        except Exception as e:
            first = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise CheckpointError(f"{self.path}: cannot load ({first})", code="CKM520") from None

    def meta(self) -> dict[str, TensorMeta]:
        return {k: TensorMeta(tuple(t.shape), dtype_name(t.dtype)) for k, t in self.state.items()}

    def ties(self) -> dict[str, tuple[str, ...]]:
        return ties_of(self.state)

    def get(self, name: str) -> torch.Tensor:
        return self.state[name]

    def done(self, name: str) -> None:
        """The file's pages under this tensor leave the process (they stay in the page cache
        and come back from the file if read again): a streamed checkpoint does not pile up."""
        if self.mapped:
            storage = self.state[name].untyped_storage()
            _drop_file_pages(storage.data_ptr(), storage.nbytes())


def _drop_file_pages(address: int, length: int) -> None:
    """madvise(MADV_DONTNEED) on a clean, file-backed, private mapping: safe to drop, the
    file still has the bytes. Never called on anonymous memory, where it would zero it."""
    libc = _libc()
    if libc is None or length <= 0:
        return
    page = mmap.PAGESIZE
    start = address - address % page
    libc.madvise(ctypes.c_void_p(start), ctypes.c_size_t(address + length - start), 4)


@functools.cache
def _libc() -> Any:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        return libc
    except (OSError, AttributeError):
        return None


def _mapping_is_exact(path: Path) -> bool:
    """Whether `torch.load(mmap=True)` reads exactly what the file holds: every storage record
    stored uncompressed, and as long as the tensors the pickle builds on it need.

    Raises CheckpointError for a record shorter or longer than its tensors (a plain load
    refuses those too). False where mapping would read the wrong bytes (compressed records)
    or the file cannot be checked; torch's own load then reads and checks every record.
    """
    import io
    import zipfile

    import torch
    from torch import _weights_only_unpickler as restricted

    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
            if len(names) != len(set(names)):  # readers disagree on which entry counts
                twice = sorted({n for n in names if names.count(n) > 1})[0]
                raise CheckpointError(
                    f"{path}: the zip holds {twice!r} twice (a damaged file)", code="CKM525"
                )
            pickles = [n for n in names if n.endswith("/data.pkl")]
            if len(pickles) != 1:
                return False
            prefix = pickles[0].removesuffix("data.pkl")
            needs: dict[str, int] = {}

            def persistent_load(saved_id: Any) -> Any:
                _, storage_type, key, _, numel = saved_id
                dtype = torch.uint8 if storage_type is torch.UntypedStorage else storage_type.dtype
                nbytes = int(numel) * torch._utils._element_size(dtype)
                if needs.setdefault(str(key), nbytes) != nbytes:  # torch takes the first
                    raise CheckpointError(
                        f"{path}: storage {key} is claimed with {needs[str(key)]} and {nbytes} "
                        "bytes (a damaged file)",
                        code="CKM525",
                    )
                return torch.storage.TypedStorage(
                    wrap_storage=torch.UntypedStorage(nbytes, device="meta"),
                    dtype=dtype,
                    _internal=True,
                )

            unpickler = restricted.Unpickler(io.BytesIO(archive.read(pickles[0])), encoding="utf-8")
            unpickler.persistent_load = persistent_load  # type: ignore[method-assign]
            with warnings.catch_warnings():  # TypedStorage's deprecation: ours, not the user's
                warnings.simplefilter("ignore")
                unpickler.load()
            for key, nbytes in needs.items():
                info = archive.getinfo(f"{prefix}data/{key}")
                if info.compress_type != zipfile.ZIP_STORED:
                    return False
                if info.file_size != nbytes:
                    raise CheckpointError(
                        f"{path}: record data/{key} holds {info.file_size} bytes but its "
                        f"tensors need {nbytes} (a damaged file)",
                        code="CKM525",
                    )
    except CheckpointError:
        raise
    except Exception:  # not a zip, an odd layout: let torch's checked load decide
        return False
    return True


def _has_tensors(obj: Any) -> bool:
    import torch

    return isinstance(obj, dict) and any(isinstance(v, torch.Tensor) for v in obj.values())


def pick_state_dict(obj: Any, select: str | None, path: Path) -> tuple[dict[str, Any], list[str]]:
    """The tensors of a (possibly nested) checkpoint, and notes on what else it holds."""
    import torch

    where = "the checkpoint"
    if select:
        for part in select.split("."):
            if not isinstance(obj, dict) or part not in obj:
                keys = ", ".join(map(str, obj)) if isinstance(obj, dict) else type(obj).__name__
                raise CheckpointError(
                    f"{path}: no {select!r} in the checkpoint (at this level: {keys})",
                    code="CKM523",
                )
            obj = obj[part]
        where = repr(select)
    if not isinstance(obj, dict):
        raise CheckpointError(
            f"{path}: {where} holds a {type(obj).__name__}, not a state_dict", code="CKM523"
        )
    candidates = [k for k, v in obj.items() if _has_tensors(v)]
    if not select and not _has_tensors(obj):
        if len(candidates) > 1:
            raise CheckpointError(
                f"{path}: several sets of weights inside ({', '.join(map(str, candidates))}); "
                "choose one with --select",
                code="CKM524",
            )
        if not candidates:
            raise CheckpointError(f"{path}: no tensors found in the checkpoint", code="CKM523")
        picked = candidates[0]
        notes = [f"weights taken from {picked!r}"] + [
            f"{k!r} ({type(v).__name__}) left out" for k, v in obj.items() if k != picked
        ]
        obj = obj[picked]
    else:
        notes = [f"weights taken from {where}"] if select else []
    tensors = {
        k: v
        for k, v in obj.items()
        if isinstance(k, str) and isinstance(v, torch.Tensor) and not v.is_nested
    }
    notes += [
        f"{k!r} ({'a nested tensor' if isinstance(v, torch.Tensor) else type(v).__name__}) "
        "is not a plain tensor, left out"
        for k, v in obj.items()
        if k not in tensors
    ]
    check_keys(tensors, str(path))
    return tensors, notes
