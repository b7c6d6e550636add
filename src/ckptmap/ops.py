"""Tensor operations: each infers its output shapes and dtypes without data, runs, and inverts.

An op is one-to-one (`transpose`), many-to-one (`cat`, `stack`) or one-to-many
(`split`, `unstack`). `infer` is what makes plans validate before anything is
read; `inverse` is exact, computed from the concrete shapes of one plan entry
(so `cat`'s inverse knows the sizes it must split back into). An op that loses
information has no exact inverse; some of those offer an approximate one, used
only when a caller allows lossy reversal.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, ClassVar, NamedTuple

if TYPE_CHECKING:
    import torch


class Meta(NamedTuple):
    shape: tuple[int, ...]
    dtype: str | None = None


class OpError(ValueError):
    """The op cannot take these inputs (shapes, dtypes): said in the user's words."""


class OpArgError(ValueError):
    """The op's arguments are wrong (count or type)."""


FLOAT_WIDTH = {
    "float64": 64,
    "float32": 32,
    "bfloat16": 16,
    "float16": 16,
    "float8_e4m3fn": 8,
    "float8_e5m2": 8,
}
INT_WIDTH = {"int64": 64, "int32": 32, "int16": 16, "int8": 8, "uint8": 8, "bool": 1}
DTYPE_ALIASES = {
    "bf16": "bfloat16",
    "fp16": "float16",
    "half": "float16",
    "fp32": "float32",
    "float": "float32",
    "fp64": "float64",
    "double": "float64",
    "long": "int64",
    "int": "int32",
}


class Op:
    """Base of every op. `params` names the arguments: int, ints (a list), number, word, dims."""

    name: ClassVar[str]
    kind: ClassVar[str] = "one"  # "one" | "merge" | "split"
    params: ClassVar[tuple[tuple[str, str], ...]] = ()
    optional: ClassVar[int] = 0  # how many trailing params may be left out
    lossy: ClassVar[str | None] = None  # why this op cannot be undone exactly, when it cannot

    def __init__(self, *args: Any):
        self.args = tuple(args)
        _check_args(self, self.args)

    def __repr__(self) -> str:
        return f"{self.name}({', '.join(map(_arg_text, self.args))})"

    def infer(self, ins: Sequence[Meta]) -> list[Meta]:
        raise NotImplementedError

    def run(self, xs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        raise NotImplementedError

    def inverse(self, ins: Sequence[Meta], outs: Sequence[Meta]) -> Op | None:
        """The exact inverse for these concrete shapes, or None when the op is lossy."""
        return None

    def approx_inverse(self, ins: Sequence[Meta], outs: Sequence[Meta]) -> Op | None:
        """A best-effort way back (allow_lossy=True), or None when nothing sensible exists."""
        return None

    def lossy_for(self, ins: Sequence[Meta], outs: Sequence[Meta]) -> str | None:
        return self.lossy


def _arg_text(arg: Any) -> str:
    if isinstance(arg, (list, tuple)):
        return "[" + ", ".join(_arg_text(a) for a in arg) + "]"
    return repr(arg) if isinstance(arg, float) else str(arg)


def _check_args(op: Op, args: tuple) -> None:
    wanted = op.params
    sig = f"{op.name}({', '.join(n for n, _ in wanted)})"
    if wanted and wanted[-1][1] == "dims":  # any number of ints
        if not all(_is_int(a) for a in args):
            raise OpArgError(f"{sig} takes whole numbers")
        return
    if not len(wanted) - op.optional <= len(args) <= len(wanted):
        raise OpArgError(
            f"{sig} takes {_count(op)} argument{'s' * (len(wanted) != 1)}, got {len(args)}"
        )
    for (name, kind), arg in zip(wanted, args, strict=False):
        ok = {
            "int": _is_int(arg),
            "ints": isinstance(arg, (list, tuple)) and all(_is_int(a) for a in arg),
            "sizes": (_is_int(arg) and arg > 0)
            or (isinstance(arg, (list, tuple)) and all(_is_int(a) for a in arg)),
            "number": isinstance(arg, (int, float)) and not isinstance(arg, bool),
            "word": isinstance(arg, str),
        }[kind]
        if not ok:
            what = {
                "int": "a whole number",
                "ints": "a list of whole numbers",
                "sizes": "a number of equal parts above 0, or a list of sizes",
                "number": "a number",
                "word": "a word",
            }[kind]
            raise OpArgError(f"{sig}: {name} must be {what}, not {_arg_text(arg)}")


def _count(op: Op) -> str:
    n = len(op.params)
    return f"{n - op.optional} to {n}" if op.optional else str(n)


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _dim(dim: int, ndim: int) -> int:
    if not -ndim <= dim < max(ndim, 1):
        raise OpError(f"dimension {dim} does not exist in a {ndim}-d tensor")
    return dim % ndim if ndim else 0


def _one(ins: Sequence[Meta]) -> Meta:
    return ins[0]


def dtype_of(word: str) -> str:
    import torch

    name = DTYPE_ALIASES.get(word, word)
    if not isinstance(getattr(torch, name, None), torch.dtype):
        raise OpArgError(f"unknown dtype {word!r} (float32, bfloat16, float16, …)")
    return name


# --- one-to-one ------------------------------------------------------------------------------


class Transpose(Op):
    name = "transpose"
    params = (("dim0", "int"), ("dim1", "int"))

    def infer(self, ins):
        m = _one(ins)
        a, b = (_dim(d, len(m.shape)) for d in self.args)
        shape = list(m.shape)
        shape[a], shape[b] = shape[b], shape[a]
        return [Meta(tuple(shape), m.dtype)]

    def run(self, xs):
        return [xs[0].transpose(*self.args)]

    def inverse(self, ins, outs):
        return self


class Permute(Op):
    name = "permute"
    params = (("dims", "dims"),)

    def infer(self, ins):
        m = _one(ins)
        n = len(m.shape)
        dims = [_dim(d, n) for d in self.args]
        if sorted(dims) != list(range(n)):
            raise OpError(f"permute{tuple(self.args)} is not an ordering of the {n} dimensions")
        return [Meta(tuple(m.shape[d] for d in dims), m.dtype)]

    def run(self, xs):
        return [xs[0].permute(*self.args)]

    def inverse(self, ins, outs):
        n = len(ins[0].shape)
        dims = [_dim(d, n) for d in self.args]
        back = [0] * n
        for i, d in enumerate(dims):
            back[d] = i
        return Permute(*back)


class Reshape(Op):
    name = "reshape"
    params = (("shape", "ints"),)

    def infer(self, ins):
        m = _one(ins)
        shape = list(self.args[0])
        total = math.prod(m.shape)
        if shape.count(-1) > 1 or any(d < -1 for d in shape):
            raise OpError(f"reshape({shape}): at most one -1, no other negative sizes")
        if -1 in shape:
            known = math.prod(d for d in shape if d != -1)
            if known == 0 or total % known:
                raise OpError(f"cannot reshape {list(m.shape)} ({total} values) to {shape}")
            shape[shape.index(-1)] = total // known
        if math.prod(shape) != total:
            raise OpError(f"cannot reshape {list(m.shape)} ({total} values) to {shape}")
        return [Meta(tuple(shape), m.dtype)]

    def run(self, xs):
        return [xs[0].reshape(list(self.args[0]))]

    def inverse(self, ins, outs):
        return Reshape(list(ins[0].shape))


class Cast(Op):
    name = "cast"
    params = (("dtype", "word"),)

    def __init__(self, *args):
        super().__init__(*args)
        self.dtype = dtype_of(self.args[0])

    def infer(self, ins):
        return [Meta(_one(ins).shape, self.dtype)]

    def run(self, xs):
        import torch

        return [xs[0].to(getattr(torch, self.dtype))]

    def lossy_for(self, ins, outs):
        src = ins[0].dtype
        if src is None or src == self.dtype:
            return None
        if _widens(src, self.dtype):  # exact forward; what the wider dtype then holds is not
            return f"cast {src} -> {self.dtype}: the way back narrows to {src}"
        return f"cast {src} -> {self.dtype} narrows"

    def inverse(self, ins, outs):
        return Cast(ins[0].dtype) if ins[0].dtype == self.dtype else None

    def approx_inverse(self, ins, outs):
        return Cast(ins[0].dtype) if ins[0].dtype else None


def _widens(src: str, dst: str) -> bool:
    """Every value of src is exactly representable in dst."""
    if src == dst:
        return True
    if src in FLOAT_WIDTH and dst in FLOAT_WIDTH:
        exact = {
            ("float16", "float32"),
            ("float16", "float64"),
            ("bfloat16", "float32"),
            ("bfloat16", "float64"),
            ("float32", "float64"),
            ("float8_e4m3fn", "float16"),
            ("float8_e4m3fn", "bfloat16"),
            ("float8_e4m3fn", "float32"),
            ("float8_e5m2", "float16"),
            ("float8_e5m2", "bfloat16"),
            ("float8_e5m2", "float32"),
        }
        return (src, dst) in exact
    if src in INT_WIDTH and dst in INT_WIDTH:
        if src == "bool":
            return True
        if src == "uint8":
            return dst in ("int16", "int32", "int64")
        return dst != "uint8" and dst != "bool" and INT_WIDTH[dst] >= INT_WIDTH[src]
    if src in INT_WIDTH and dst in FLOAT_WIDTH:
        mantissa = {"float64": 53, "float32": 24, "bfloat16": 8, "float16": 11}.get(dst, 0)
        return INT_WIDTH[src] <= mantissa
    return False


class Slice(Op):
    name = "slice"
    params = (("dim", "int"), ("start", "int"), ("stop", "int"))
    lossy = "slice keeps part of the tensor"

    def infer(self, ins):
        m = _one(ins)
        d = _dim(self.args[0], len(m.shape))
        start, stop, _ = slice(self.args[1], self.args[2]).indices(m.shape[d])
        shape = list(m.shape)
        shape[d] = max(0, stop - start)
        return [Meta(tuple(shape), m.dtype)]

    def run(self, xs):
        dim, start, stop = self.args
        n = xs[0].shape[dim]
        start, stop, _ = slice(start, stop).indices(n)
        return [xs[0].narrow(dim, start, max(0, stop - start))]

    def lossy_for(self, ins, outs):
        return None if ins[0].shape == outs[0].shape else self.lossy

    def inverse(self, ins, outs):
        return Slice(*self.args) if ins[0].shape == outs[0].shape else None


class Select(Op):
    name = "select"
    params = (("dim", "int"), ("indices", "ints"))
    lossy = "select keeps some rows"

    def infer(self, ins):
        m = _one(ins)
        d = _dim(self.args[0], len(m.shape))
        bad = [i for i in self.args[1] if not -m.shape[d] <= i < m.shape[d]]
        if bad:
            raise OpError(f"indices {bad} are outside dimension {d} of size {m.shape[d]}")
        shape = list(m.shape)
        shape[d] = len(self.args[1])
        return [Meta(tuple(shape), m.dtype)]

    def run(self, xs):
        import torch

        n = xs[0].shape[self.args[0]]
        index = torch.tensor([i % n for i in self.args[1]], dtype=torch.long)  # -1: the last
        return [xs[0].index_select(self.args[0], index)]

    def _order(self, ins):
        n = ins[0].shape[_dim(self.args[0], len(ins[0].shape))]
        picked = [i % n for i in self.args[1]]
        return picked if sorted(picked) == list(range(n)) else None

    def lossy_for(self, ins, outs):
        return None if self._order(ins) else self.lossy

    def inverse(self, ins, outs):
        order = self._order(ins)  # a reordering of every row undoes exactly
        if order is None:
            return None
        back = [0] * len(order)
        for i, j in enumerate(order):
            back[j] = i
        return Select(self.args[0], back)


class Pad(Op):
    name = "pad"
    params = (("dim", "int"), ("before", "int"), ("after", "int"), ("value", "number"))
    optional = 1
    # the way back cuts the added rows off: whatever training put there is lost
    lossy = "pad's added rows would be dropped on the way back"

    def infer(self, ins):
        m = _one(ins)
        d = _dim(self.args[0], len(m.shape))
        before, after = self.args[1], self.args[2]
        if before < 0 or after < 0:
            raise OpError("pad takes sizes of zero or more (use slice to cut)")
        shape = list(m.shape)
        shape[d] += before + after
        return [Meta(tuple(shape), m.dtype)]

    def run(self, xs):
        import torch

        x = xs[0]
        dim, before, after = self.args[:3]
        value = self.args[3] if len(self.args) > 3 else 0
        d = dim % x.dim()
        parts = []
        for size in (before, after):
            shape = list(x.shape)
            shape[d] = size
            parts.append(torch.full(shape, value, dtype=x.dtype))
        return [torch.cat([parts[0], x, parts[1]], d)]

    def lossy_for(self, ins, outs):
        return None if ins[0].shape == outs[0].shape else self.lossy

    def inverse(self, ins, outs):
        return self.approx_inverse(ins, outs) if ins[0].shape == outs[0].shape else None

    def approx_inverse(self, ins, outs):
        d = _dim(self.args[0], len(ins[0].shape))
        return Slice(d, self.args[1], self.args[1] + ins[0].shape[d])


class RopePermute(Op):
    """Meta Llama q/k rows -> Hugging Face's rotary layout (as HF's conversion script does)."""

    name = "rope_permute"
    params = (("heads", "int"),)

    def infer(self, ins):
        m = _one(ins)
        heads = self.args[0]
        if len(m.shape) not in (1, 2) or heads <= 0 or m.shape[0] % (2 * heads):
            raise OpError(
                f"{self.name}({heads}) needs rows divisible by 2 * heads; got {list(m.shape)}"
            )
        return [m]

    def _rows(self, x, forward: bool):
        heads = self.args[0]
        rows = x.shape[0]
        rest = x.shape[1:]
        half = rows // heads // 2
        if forward:
            return x.reshape(heads, half, 2, *rest).transpose(1, 2).reshape(rows, *rest)
        return x.reshape(heads, 2, half, *rest).transpose(1, 2).reshape(rows, *rest)

    def run(self, xs):
        return [self._rows(xs[0], True)]

    def inverse(self, ins, outs):
        return RopeUnpermute(*self.args)


class RopeUnpermute(RopePermute):
    """Hugging Face's rotary layout -> Meta Llama's interleaved q/k rows."""

    name = "rope_unpermute"

    def run(self, xs):
        return [self._rows(xs[0], False)]

    def inverse(self, ins, outs):
        return RopePermute(*self.args)


class ResizePosEmbed(Op):
    """ViT absolute position embeddings resized to a new patch grid, prefix tokens kept (timm)."""

    name = "resize_pos_embed"
    params = (("grid", "ints"), ("prefix_tokens", "int"), ("mode", "word"))
    optional = 2
    lossy = "interpolating position embeddings cannot be undone exactly"

    def _settings(self):
        grid = list(self.args[0])
        prefix = self.args[1] if len(self.args) > 1 else 1
        mode = self.args[2] if len(self.args) > 2 else "bicubic"
        return grid, prefix, mode

    def infer(self, ins):
        m = _one(ins)
        grid, prefix, mode = self._settings()
        if len(grid) != 2 or min(grid) <= 0:
            raise OpError(f"grid must be [height, width], got {grid}")
        if mode not in ("bicubic", "bilinear", "nearest", "area"):
            raise OpError(f"mode {mode!r}: bicubic, bilinear, nearest or area")
        if len(m.shape) not in (2, 3) or (len(m.shape) == 3 and m.shape[0] != 1):
            raise OpError(f"expects [1, tokens, dim] or [tokens, dim], got {list(m.shape)}")
        tokens = m.shape[-2] - prefix
        side = math.isqrt(max(tokens, 0))
        if tokens <= 0 or side * side != tokens:
            raise OpError(
                f"{m.shape[-2]} tokens minus {prefix} prefix token(s) is not a square grid"
            )
        shape = list(m.shape)
        shape[-2] = prefix + grid[0] * grid[1]
        return [Meta(tuple(shape), m.dtype)]

    def run(self, xs):
        import torch
        import torch.nn.functional as F

        grid, prefix, mode = self._settings()
        x = xs[0]
        flat = x.dim() == 2
        if flat:
            x = x.unsqueeze(0)
        head, body = x[:, :prefix], x[:, prefix:]
        side = math.isqrt(body.shape[1])
        dim = body.shape[-1]
        img = body.float().reshape(1, side, side, dim).permute(0, 3, 1, 2)
        kwargs = {"antialias": True} if mode in ("bicubic", "bilinear") else {}
        if mode in ("bicubic", "bilinear"):
            kwargs["align_corners"] = False
        img = F.interpolate(img, size=tuple(grid), mode=mode, **kwargs)
        body = img.permute(0, 2, 3, 1).reshape(1, -1, dim).to(x.dtype)
        out = torch.cat([head, body], 1)
        return [out[0] if flat else out]

    def approx_inverse(self, ins, outs):
        tokens = ins[0].shape[-2] - self._settings()[1]
        side = math.isqrt(tokens)
        return ResizePosEmbed([side, side], *self.args[1:])


class AdaptInChannels(Op):
    """A first conv's input channels changed the way timm's adapt_input_conv does it."""

    name = "adapt_in_channels"
    params = (("channels", "int"),)
    lossy = "summing or repeating input channels cannot be undone"

    def infer(self, ins):
        m = _one(ins)
        n = self.args[0]
        if len(m.shape) < 3 or n <= 0:
            raise OpError(f"expects a conv weight [out, in, ...], got {list(m.shape)}")
        cin = m.shape[1]
        if n == 1 and cin > 3 and cin % 3:
            raise OpError(f"{cin} input channels cannot fold to 1 (needs 3 or a multiple of 3)")
        if n not in (1, cin) and cin != 3:
            raise OpError(f"only 3 input channels can become {n}; this conv has {cin}")
        shape = list(m.shape)
        shape[1] = n
        return [Meta(tuple(shape), m.dtype)]

    def run(self, xs):
        w = xs[0]
        n = self.args[0]
        dtype = w.dtype
        w = w.float()
        o, cin, *k = w.shape
        if n == 1:
            w = w.reshape(o, cin // 3, 3, *k).sum(2) if cin > 3 else w.sum(1, keepdim=True)
        elif n != cin:
            repeat = math.ceil(n / 3)
            w = w.repeat(1, repeat, *([1] * len(k)))[:, :n] * (3 / n)
        return [w.to(dtype)]

    def lossy_for(self, ins, outs):
        return None if ins[0].shape == outs[0].shape else self.lossy

    def inverse(self, ins, outs):
        return self if ins[0].shape == outs[0].shape else None


# --- many-to-one and one-to-many ---------------------------------------------------------------


class Cat(Op):
    name = "cat"
    kind = "merge"
    params = (("dim", "int"),)

    def infer(self, ins):
        first = ins[0]
        d = _dim(self.args[0], len(first.shape))
        for m in ins[1:]:
            same = len(m.shape) == len(first.shape) and all(
                a == b for i, (a, b) in enumerate(zip(m.shape, first.shape, strict=False)) if i != d
            )
            if not same:
                raise OpError(
                    f"cannot cat {[list(m.shape) for m in ins]} along dimension {d}: "
                    "the other dimensions differ"
                )
            if m.dtype != first.dtype:
                raise OpError(f"cannot cat tensors of {first.dtype} and {m.dtype}")
        shape = list(first.shape)
        shape[d] = sum(m.shape[d] for m in ins)
        return [Meta(tuple(shape), first.dtype)]

    def run(self, xs):
        import torch

        return [torch.cat(list(xs), self.args[0])]

    def inverse(self, ins, outs):
        d = _dim(self.args[0], len(ins[0].shape))
        return Split([m.shape[d] for m in ins], d)


class Stack(Op):
    name = "stack"
    kind = "merge"
    params = (("dim", "int"),)

    def infer(self, ins):
        first = ins[0]
        for m in ins[1:]:
            if m.shape != first.shape or m.dtype != first.dtype:
                raise OpError(
                    f"cannot stack {[list(m.shape) for m in ins]}: shapes and dtypes must agree"
                )
        d = _dim(self.args[0], len(first.shape) + 1)
        shape = list(first.shape)
        shape.insert(d, len(ins))
        return [Meta(tuple(shape), first.dtype)]

    def run(self, xs):
        import torch

        return [torch.stack(list(xs), self.args[0])]

    def inverse(self, ins, outs):
        return Unstack(_dim(self.args[0], len(ins[0].shape) + 1))


class Split(Op):
    """split([8, 4, 4], 0) into those sizes; split(3, 0) into 3 equal parts."""

    name = "split"
    kind = "split"
    params = (("sizes", "sizes"), ("dim", "int"))

    def _sizes(self, m: Meta) -> list[int]:
        sizes, dim = self.args
        d = _dim(dim, len(m.shape))
        if isinstance(sizes, int):
            if m.shape[d] % sizes:
                raise OpError(
                    f"split({sizes}, {dim}): dimension {d} of {list(m.shape)} does not divide "
                    f"into {sizes} equal parts"
                )
            return [m.shape[d] // sizes] * sizes
        return list(sizes)

    def infer(self, ins):
        m = _one(ins)
        sizes, dim = self._sizes(m), self.args[1]
        d = _dim(dim, len(m.shape))
        if any(s < 0 for s in sizes) or sum(sizes) != m.shape[d]:
            raise OpError(
                f"split({sizes}, {dim}) needs sizes adding up to {m.shape[d]} "
                f"(dimension {d} of {list(m.shape)}); they add up to {sum(sizes)}"
            )
        out = []
        for s in sizes:
            shape = list(m.shape)
            shape[d] = s
            out.append(Meta(tuple(shape), m.dtype))
        return out

    def run(self, xs):
        return list(xs[0].split(self._sizes(Meta(tuple(xs[0].shape))), self.args[1]))

    def inverse(self, ins, outs):
        return Cat(_dim(self.args[1], len(ins[0].shape)))


class Unstack(Op):
    name = "unstack"
    kind = "split"
    params = (("dim", "int"),)

    def infer(self, ins):
        m = _one(ins)
        d = _dim(self.args[0], len(m.shape))
        shape = m.shape[:d] + m.shape[d + 1 :]
        return [Meta(shape, m.dtype) for _ in range(m.shape[d])]

    def run(self, xs):
        return list(xs[0].unbind(self.args[0]))

    def inverse(self, ins, outs):
        return Stack(_dim(self.args[0], len(ins[0].shape)))


class _Fill(Op):
    """A tensor made from nothing, for a tensor a revision introduces (`init P | zeros()`).

    The rule gives the leading arguments; the plan appends the shape and dtype from the
    revision's schema, so each step of a plan is complete on its own."""

    kind = "fill"
    optional = 2
    lossy = "a revision introduced it, and the way back drops it"

    def infer(self, ins):
        shape, dtype = self.args[-2:]
        return [Meta(tuple(shape), dtype)]

    def run(self, xs):
        import torch

        shape, dtype = self.args[-2:]
        return [self._make(torch, list(shape), getattr(torch, dtype))]

    def _make(self, torch: Any, shape: list[int], dtype: Any) -> Any:
        raise NotImplementedError


class Zeros(_Fill):
    name = "zeros"
    params = (("shape", "ints"), ("dtype", "word"))

    def _make(self, torch, shape, dtype):
        return torch.zeros(shape, dtype=dtype)


class Ones(_Fill):
    name = "ones"
    params = (("shape", "ints"), ("dtype", "word"))

    def _make(self, torch, shape, dtype):
        return torch.ones(shape, dtype=dtype)


class Normal(_Fill):
    """`normal(mean, std, seed)`: each tensor drawn from its own generator, seeded so."""

    name = "normal"
    params = (
        ("mean", "number"),
        ("std", "number"),
        ("seed", "int"),
        ("shape", "ints"),
        ("dtype", "word"),
    )

    def infer(self, ins):
        out = super().infer(ins)
        if out[0].dtype not in FLOAT_WIDTH:
            raise OpError(f"normal() makes floating-point values, not {out[0].dtype}")
        return out

    def _make(self, torch, shape, dtype):
        mean, std, seed = self.args[:3]
        gen = torch.Generator().manual_seed(seed)
        return (torch.randn(shape, generator=gen, dtype=torch.float64) * std + mean).to(dtype)


OPS: dict[str, type[Op]] = {
    cls.name: cls
    for cls in (
        Transpose,
        Permute,
        Reshape,
        Cast,
        Slice,
        Select,
        Pad,
        RopePermute,
        RopeUnpermute,
        ResizePosEmbed,
        AdaptInChannels,
        Cat,
        Stack,
        Split,
        Unstack,
        Zeros,
        Ones,
        Normal,
    )
}


def make(name: str, args: Sequence[Any]) -> Op:
    """An op by name; OpArgError for an unknown name or wrong arguments."""
    if name not in OPS:
        import difflib

        close = difflib.get_close_matches(name, OPS, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise OpArgError(f"unknown op {name!r}{hint}")
    return OPS[name](*[list(a) if isinstance(a, tuple) else a for a in args])
