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
    """The largest |a - b| and |a - b| / |b|, and how many values differ past the tolerance.

    Floats: NaN equals NaN, an infinity equals itself only. Integers and bools are compared
    exactly (a float's 53 bits would call 2**62 and 2**62 + 1 equal); the tolerance then
    applies to their difference.
    """
    import torch

    exact_kind = not (x.dtype.is_floating_point or x.dtype.is_complex)
    wide = torch.complex128 if x.is_complex() or y.is_complex() else torch.float64
    fx, fy = x.reshape(-1), y.reshape(-1)
    worst_abs = worst_rel = 0.0
    bad = 0
    for start in range(0, fx.numel(), _BLOCK):
        a, b = fx[start : start + _BLOCK], fy[start : start + _BLOCK]
        if exact_kind:
            same = a == b
            p, q = a.to(torch.float64), b.to(torch.float64)
        else:
            p, q = a.to(wide), b.to(wide)
            same = (p == q) | (torch.isnan(p) & torch.isnan(q))
        gap = (p - q).abs()
        gap = torch.where(same, torch.zeros_like(gap), gap)
        gap = torch.where(torch.isnan(gap), torch.full_like(gap, math.inf), gap)
        scale = q.abs()
        if exact_kind:  # unequal integers at least 1 apart, whatever float64 made of them
            gap = torch.where(same, gap, gap.clamp(min=1.0))
        within = torch.isfinite(gap) & (gap <= atol + rtol * scale)
        bad += int((~same & ~within).sum())
        if gap.numel():
            worst_abs = max(worst_abs, float(gap.max()))
            rel = torch.where(gap == 0, torch.zeros_like(gap), gap / scale)
            rel = torch.where(torch.isnan(rel), torch.full_like(rel, math.inf), rel)
            worst_rel = max(worst_rel, float(rel.max()))
    return worst_abs, worst_rel, bad


def _num(x: float) -> str:
    return "inf" if math.isinf(x) else f"{x:.3g}"
