"""Which part of an op's inputs one box of its output needs: the index maps of the ops.

A box is a rectangle of a tensor, `(offsets, sizes)`. For an op whose index map is a
rectangle (cat, split, stack, unstack along a dim, transpose, permute, slice, cast), a
box of an output needs one box of each input it touches, and the box of the output is
computed from those pieces alone. An op that works along some dimensions only (RoPE's
row permutation, select, pad, adapt_in_channels) is a rectangle too when the box spans
those dimensions whole. Anything else (a reshape, a RoPE permutation of a box that cuts
through the rows) needs its inputs whole: `needs` says None, and the caller computes the
whole output and cuts the box from it, never converting a slice.

Plain data and torch tensors only: distributed loading (`dcp.py`) builds on it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .ops import Meta, Op, _dim, make

if TYPE_CHECKING:
    import torch

Box = tuple[tuple[int, ...], tuple[int, ...]]  # offsets, sizes


def whole(shape: Sequence[int]) -> Box:
    return (0,) * len(shape), tuple(shape)


def is_empty(box: Box) -> bool:
    return any(s == 0 for s in box[1])


def _replace(box: Box, dim: int, offset: int, size: int) -> Box:
    offsets, sizes = list(box[0]), list(box[1])
    offsets[dim], sizes[dim] = offset, size
    return tuple(offsets), tuple(sizes)


def _touched(op: Op, ins: Sequence[Meta]) -> set[int] | None:
    """The dimensions an op works along, for ops that leave the others be."""
    ndim = len(ins[0].shape) if ins else 0
    if op.name in ("rope_permute", "rope_unpermute"):
        return {0}
    if op.name in ("select", "pad"):
        return {_dim(op.args[0], ndim)}
    if op.name == "adapt_in_channels":
        return {1}
    return None


def needs(op: Op, ins: Sequence[Meta], outs: Sequence[Meta], k: int, box: Box) -> list | None:
    """The boxes of the inputs that output `k`'s `box` is computed from, as
    `[(input index, box), ...]` in the order `compute` takes the pieces; None when the
    op needs its inputs whole for this box."""
    offsets, sizes = box
    name = op.name
    if name == "cast":
        return [(0, box)]
    if name == "transpose":
        a, b = (_dim(d, len(offsets)) for d in op.args)
        o, s = list(offsets), list(sizes)
        o[a], o[b], s[a], s[b] = o[b], o[a], s[b], s[a]
        return [(0, (tuple(o), tuple(s)))]
    if name == "permute":
        dims = [_dim(d, len(offsets)) for d in op.args]
        o, s = [0] * len(dims), [0] * len(dims)
        for i, d in enumerate(dims):
            o[d], s[d] = offsets[i], sizes[i]
        return [(0, (tuple(o), tuple(s)))]
    if name == "slice":
        d = _dim(op.args[0], len(offsets))
        start = slice(op.args[1], op.args[2]).indices(ins[0].shape[d])[0]
        return [(0, _replace(box, d, offsets[d] + start, sizes[d]))]
    if name == "split":
        d = _dim(op.args[1], len(offsets))
        start = sum(m.shape[d] for m in outs[:k])
        return [(0, _replace(box, d, offsets[d] + start, sizes[d]))]
    if name == "unstack":
        d = _dim(op.args[0], len(offsets) + 1)
        return [(0, ((*offsets[:d], k, *offsets[d:]), (*sizes[:d], 1, *sizes[d:])))]
    if name == "cat":
        d = _dim(op.args[0], len(offsets))
        lo, hi = offsets[d], offsets[d] + sizes[d]
        pieces, start = [], 0
        for j, m in enumerate(ins):
            end = start + m.shape[d]
            a, b = max(lo, start), min(hi, end)
            if a < b:
                pieces.append((j, _replace(box, d, a - start, b - a)))
            start = end
        return pieces
    if name == "stack":
        d = _dim(op.args[0], len(offsets))
        rest = (offsets[:d] + offsets[d + 1 :], sizes[:d] + sizes[d + 1 :])
        return [(j, rest) for j in range(offsets[d], offsets[d] + sizes[d])]
    touched = _touched(op, ins)
    if touched is None or len(ins) != 1 or len(ins[0].shape) != len(offsets):
        return None
    if any(offsets[d] != 0 or sizes[d] != outs[k].shape[d] for d in touched):
        return None  # the box cuts through a dimension the op works along
    in_box = box
    for d in touched:
        in_box = _replace(in_box, d, 0, ins[0].shape[d])
    return [(0, in_box)]


def compute(op: Op, ins: Sequence[Meta], k: int, box: Box, pieces: list[torch.Tensor]) -> Any:
    """Output `k`'s `box`, from the pieces `needs` asked for."""
    import torch

    name = op.name
    if name in ("slice", "split"):
        return pieces[0]
    if name == "unstack":
        return pieces[0].squeeze(_dim(op.args[0], len(box[0]) + 1))
    if name == "cat":
        if len(pieces) == 1:
            return pieces[0]
        return torch.cat(pieces, _dim(op.args[0], len(box[0])))
    if name == "stack":
        return torch.stack(pieces, _dim(op.args[0], len(box[0])))
    return op.run(pieces)[0]  # cast, transpose, permute; ops along dimensions the box spans


def cut(tensor: torch.Tensor, box: Box) -> torch.Tensor:
    """The box of a whole tensor (a view)."""
    for d, (o, s) in enumerate(zip(*box, strict=True)):
        if o != 0 or s != tensor.shape[d]:
            tensor = tensor.narrow(d, o, s)
    return tensor


# --- a box of a plan's value, from boxes of its sources ----------------------------------------


@dataclass(eq=False)
class Read:
    """A box of one source tensor, to be read."""

    source: str
    box: Box


@dataclass(eq=False)
class Part:
    """Output `k` of one plan step, over `box`: from the parts of its inputs (`whole`: the
    op needs them whole; the box is cut from the whole output)."""

    op: Op
    ins: list[Meta]
    k: int
    box: Box
    inputs: list[Read | Part]
    whole: bool


class Recipes:
    """How to compute any box of a plan's values from boxes of its sources."""

    def __init__(self, plan: Any):
        self.plan = plan
        self.producer = {v: step for step in plan.steps for v in step.outputs}
        self.leaf = {e.value: e.source for e in plan.sources}

    def _meta(self, value: int) -> Meta:
        v = self.plan.values[value]
        return Meta(tuple(v.shape), v.dtype)

    def of(self, value: int, box: Box) -> Read | Part:
        if value in self.leaf:
            return Read(self.leaf[value], box)
        step = self.producer[value]
        op = make(step.op, step.args)
        ins = [self._meta(v) for v in step.inputs]
        outs = [self._meta(v) for v in step.outputs]
        k = step.outputs.index(value)
        wanted = needs(op, ins, outs, k, box)
        if wanted is None:
            inputs = [self.of(v, whole(m.shape)) for v, m in zip(step.inputs, ins, strict=True)]
            return Part(op, ins, k, box, inputs, whole=True)
        inputs = [self.of(step.inputs[j], b) for j, b in wanted]
        return Part(op, ins, k, box, inputs, whole=False)


def reads(node: Read | Part) -> list[Read]:
    """Every source box a recipe reads, in order."""
    if isinstance(node, Read):
        return [node]
    return [r for child in node.inputs for r in reads(child)]


def whole_reads(node: Read | Part, inside: bool = False) -> list[Read]:
    """The reads a recipe makes whole because an op needs its input whole (the fallback)."""
    if isinstance(node, Read):
        return [node] if inside else []
    return [r for c in node.inputs for r in whole_reads(c, inside or node.whole)]


def evaluate(node: Read | Part, got: Callable[[Read], torch.Tensor]) -> torch.Tensor:
    """The box a recipe describes, from its reads (`got(read)` is what was read)."""
    if isinstance(node, Read):
        return got(node)
    pieces = [evaluate(child, got) for child in node.inputs]
    if node.whole:
        return cut(node.op.run(pieces)[node.k], node.box)
    return compute(node.op, node.ins, node.k, node.box, pieces)
