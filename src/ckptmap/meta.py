"""Tensor metadata: what planning knows of a tensor (shape, dtype), of a key set (names, ties,
parameters), and the one table of dtype sizes. Storage (io/) and planning both build on it;
it depends on neither.
"""

from __future__ import annotations

import math
import sys
from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from .errors import UsageError
from .limits import check_keys


class TensorMeta(NamedTuple):
    """What planning knows of a tensor: its shape and (when known) its dtype name."""

    shape: tuple[int, ...]
    dtype: str | None = None

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * itemsize(self.dtype)


@dataclass
class Described:
    """A source or target reduced to metadata: names, shapes, dtypes, ties, parameters."""

    meta: dict[str, TensorMeta]
    ties: dict[str, tuple[str, ...]] = field(default_factory=dict)  # key -> all keys sharing it
    parameters: frozenset[str] | None = None  # None: unknown (not an nn.Module)


def dtype_name(dtype: Any) -> str:
    return str(dtype).removeprefix("torch.")


# The one dtype table: safetensors' code -> (torch's name, bytes per element).
DTYPES: dict[str, tuple[str, int]] = {
    "F64": ("float64", 8),
    "F32": ("float32", 4),
    "F16": ("float16", 2),
    "BF16": ("bfloat16", 2),
    "I64": ("int64", 8),
    "I32": ("int32", 4),
    "I16": ("int16", 2),
    "I8": ("int8", 1),
    "U64": ("uint64", 8),
    "U32": ("uint32", 4),
    "U16": ("uint16", 2),
    "U8": ("uint8", 1),
    "BOOL": ("bool", 1),
    "F8_E4M3": ("float8_e4m3fn", 1),
    "F8_E5M2": ("float8_e5m2", 1),
}
CODES = {name: code for code, (name, _) in DTYPES.items()}

# dtypes torch has and safetensors does not: their sizes
_OTHER_SIZES = {"complex32": 4, "complex64": 8, "complex128": 16, "qint8": 1, "quint8": 1}
_OTHER_SIZES |= {"qint32": 4, "quint4x2": 1}


def itemsize(dtype: str | None) -> int:
    """Bytes per element of a dtype named as torch names it (1 when it is not known)."""
    return DTYPES[CODES[dtype]][1] if dtype in CODES else _OTHER_SIZES.get(dtype or "", 1)


def meta_of(mapping: Mapping[str, Any], role: str) -> dict[str, TensorMeta]:
    if set(map(type, mapping.values())) == {TensorMeta} and set(map(type, mapping)) == {str}:
        given = dict(mapping)  # metadata already (a header's, a plan's): checked in bulk
        check_keys(given, f"the {role}")
        return given
    torch = sys.modules.get("torch")
    tensor = torch.Tensor if torch is not None else ()
    out: dict[str, TensorMeta] = {}
    for key, value in mapping.items():
        if not isinstance(key, str):
            raise UsageError(f"{role} keys must be strings, got {key!r}")
        if isinstance(value, tensor):
            out[key] = TensorMeta(tuple(value.shape), dtype_name(value.dtype))
        elif isinstance(value, TensorMeta):
            out[key] = value
        elif isinstance(value, (tuple, list)) and all(
            type(d) is int and 0 <= d < 2**63 for d in value
        ):
            out[key] = TensorMeta(tuple(value))
        else:
            raise UsageError(
                f"{role} entry {key!r} is {value!r}: not a tensor, nor a shape (a list of "
                "whole numbers >= 0)"
            )
    check_keys(out, f"the {role}")
    return out


def has_plain_storage(t: Any) -> bool:
    """Sparse, nested and quantized tensors have no storage to compare (ties are by storage)."""
    import torch

    return t.layout == torch.strided and not t.is_nested and not t.is_quantized


def local_piece(t: Any) -> Any:
    """This process's piece of a DTensor (its local tensor); any other tensor itself."""
    return t.to_local() if hasattr(t, "to_local") else t


def ties_of(tensors: Mapping[str, Any]) -> dict[str, tuple[str, ...]]:
    """Keys whose tensors share storage (tied embeddings), grouped."""
    groups: dict[Any, list[str]] = defaultdict(list)
    for key, given in tensors.items():
        # a DTensor: tied when this rank's pieces are one storage (or it is one object)
        t = local_piece(given)
        if t.device.type == "meta" or t.numel() == 0 or not has_plain_storage(t):
            ident: Any = ("object", id(given))  # the mapping's own object: alive, its id unique
        else:
            ident = (
                t.untyped_storage().data_ptr(),
                t.storage_offset(),
                tuple(t.shape),
                tuple(t.stride()),
                t.dtype,
            )
        groups[ident].append(key)
    return {k: tuple(sorted(g)) for g in groups.values() if len(g) > 1 for k in g}
