"""Comparing tensor values between two checkpoints, one tensor (and one block) at a time."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .io import Checkpoint

_BLOCK = 1 << 22  # elements compared at once: 32 MiB of float64 per operand


def compare(a: Checkpoint, b: Checkpoint, names: list[str], atol: float, rtol: float) -> list[str]:
    """Lines for the tensors whose values differ past `|a - b| <= atol + rtol * |b|`, with
    their largest absolute and relative differences; NaN equals NaN. Each pair of tensors is
    read, compared and released before the next."""
    import torch

    out = []
    with torch.no_grad():
        for name in names:
            x, y = a.get(name), b.get(name)
            try:
                worst_abs, worst_rel, bad = _difference(x, y, atol, rtol)
            finally:
                del x, y
                a.done(name)
                b.done(name)
            if bad:
                out.append(
                    f"{name}  {bad:,} value{'s' * (bad != 1)} past tolerance, "
                    f"max abs {_num(worst_abs)}, max rel {_num(worst_rel)}"
                )
    return out


def _difference(x, y, atol: float, rtol: float) -> tuple[float, float, int]:
    import torch

    if x.dtype == torch.bool:
        x, y = x.to(torch.uint8), y.to(torch.uint8)
    wide = torch.complex128 if x.is_complex() or y.is_complex() else torch.float64
    fx, fy = x.reshape(-1), y.reshape(-1)
    worst_abs = worst_rel = 0.0
    bad = 0
    for start in range(0, fx.numel(), _BLOCK):
        p = fx[start : start + _BLOCK].to(wide)
        q = fy[start : start + _BLOCK].to(wide)
        both_nan = torch.isnan(p) & torch.isnan(q)
        gap = (p - q).abs()
        gap = torch.where(both_nan, torch.zeros_like(gap), gap)
        gap = torch.where(torch.isnan(gap), torch.full_like(gap, math.inf), gap)
        scale = q.abs()
        bad += int((gap > atol + rtol * scale).sum())
        if gap.numel():
            worst_abs = max(worst_abs, float(gap.max()))
            rel = torch.where(gap == 0, torch.zeros_like(gap), gap / scale)
            worst_rel = max(worst_rel, float(rel.max()))
    return worst_abs, worst_rel, bad


def _num(x: float) -> str:
    return "inf" if math.isinf(x) else f"{x:.3g}"
