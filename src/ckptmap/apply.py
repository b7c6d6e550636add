"""Executing plans: the mapped state_dict, streaming into a model (all or nothing), writing
a checkpoint file. The front doors that compile and plan first are in load.py."""

from __future__ import annotations

import contextlib
import contextvars
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import CkptmapError, LoadError, UsageError, needs_torch, summarize
from .meta import TensorMeta, itemsize
from .ops import make

if TYPE_CHECKING:
    import torch

    from .io import Checkpoint
    from .io.safetensors import RawBytes
    from .plan import Plan


# set while ckptmap itself loads a model: its plan has already mapped every key
LOADING: contextvars.ContextVar[bool] = contextvars.ContextVar("ckptmap_loading", default=False)


def opened(source: Any) -> Any:
    """A checkpoint path opened once, so planning and loading read one set of headers."""
    if isinstance(source, (str, Path)):
        from .io import (
            open_checkpoint,  # the readers load on first use: `import ckptmap` stays light
        )

        return open_checkpoint(source)
    return source


def tensors_of(source: Any) -> Mapping[str, torch.Tensor]:
    """The source's tensors, by name (a checkpoint is read lazily, tensor by tensor)."""
    from .io import Checkpoint

    source = opened(source)
    if isinstance(source, Checkpoint):
        return source.tensors()
    if isinstance(source, Mapping):
        return source
    raise UsageError(
        f"source must be a state_dict or a checkpoint path, not {type(source).__name__}"
    )


class Evaluator:
    """Computes a plan's tensors on demand, holding each intermediate only while it is needed.

    `fetch(source_key)` reads one source tensor. Values that several outputs need
    (the pieces of one split) are computed once; every value is released as soon
    as its last consumer has it, so memory stays near the largest group.
    """

    def __init__(
        self,
        plan: Plan,
        fetch: Callable[[str], torch.Tensor],
        wanted: list[int],
        done: Callable[[str], None] | None = None,
        raw: Callable[[str], RawBytes | None] | None = None,
    ):
        from collections import Counter

        self.plan = plan
        self.fetch = fetch
        self.done = done  # told when a source tensor is no longer needed
        self.raw = raw  # where a source's bytes lie in its file, when they can be read directly
        self.producer = {v: step for step in plan.steps for v in step.outputs}
        self.leaf = {e.value: e.source for e in plan.sources}
        self.uses: Counter[int] = Counter(wanted)
        seen: set[int] = set()
        stack = list(wanted)
        while stack:  # count consumers over the part of the graph the outputs need
            v = stack.pop()
            step = self.producer.get(v)
            if step is None or id(step) in seen:
                continue
            seen.add(id(step))
            self.uses.update(step.inputs)
            stack.extend(step.inputs)
        self.memo: dict[int, torch.Tensor] = {}
        self._pending: int | None = None  # what the consumer took last
        # a source is done when every output made from it has been consumed: an output may
        # be a view of it (transpose, a split piece) that is read only by its consumer
        self.sources_of = {w: self._leaves(w) for w in set(wanted)}
        self.outputs_left: Counter[str] = Counter(
            name for w in wanted for name in self.sources_of[w]
        )

    def _leaves(self, value: int) -> set[str]:
        if value in self.leaf:
            return {self.leaf[value]}
        return set().union(*(self._leaves(v) for v in self.producer[value].inputs))

    def take(self, value: int) -> torch.Tensor:
        """The tensor of `value`, for a consumer that uses it before its next `take` (a
        writer, a loader): what the previous take handed out is released now."""
        self.finish()
        tensor = self._compute(value)
        self._pending = value
        return tensor

    def finish(self) -> None:
        """The consumer is done with what it took last."""
        pending, self._pending = self._pending, None
        if pending is None:
            return
        self._release(pending)
        for name in self.sources_of[pending]:
            self.outputs_left[name] -= 1
            if self.outputs_left[name] == 0 and self.done is not None:
                self.done(name)

    def _compute(self, value: int) -> torch.Tensor:
        if value in self.memo:
            return self.memo[value]
        if value in self.leaf:
            self.memo[value] = self.fetch(self.leaf[value])
            return self.memo[value]
        step = self.producer[value]
        gathered = self._gather(step)
        if gathered is not None:
            outputs = [gathered]
        else:
            inputs = [self._compute(v) for v in step.inputs]
            outputs = make(step.op, step.args).run(inputs)
            del inputs
        self.memo.update(zip(step.outputs, outputs, strict=True))
        for v in step.inputs:  # after the op has read them
            self._release(v)
        return self.memo[value]

    def _gather(self, step: Any) -> torch.Tensor | None:
        """A cat or stack along the first dimension of source tensors that nothing else
        needs, read from the file straight into their places in the result: the group is
        held once, not twice (pieces and result). None when that does not apply."""
        if self.raw is None or step.op not in ("cat", "stack"):
            return None
        values = self.plan.values
        out = values[step.outputs[0]]
        if step.args[0] % len(out.shape) != 0:
            return None
        pieces = []
        for v in step.inputs:
            if v not in self.leaf or v in self.memo or self.uses[v] != 1:
                return None
            if values[v].dtype != out.dtype or out.dtype is None:
                return None
            where = self.raw(self.leaf[v])
            if where is None:
                return None
            pieces.append((where, values[v].shape[0] if step.op == "cat" else 1))
        import torch

        result = torch.empty(out.shape, dtype=getattr(torch, out.dtype))
        start = 0
        for where, rows in pieces:
            where.read_into(result.narrow(0, start, rows))
            start += rows
        return result

    def _release(self, value: int) -> None:
        self.uses[value] -= 1
        if self.uses[value] <= 0:
            self.memo.pop(value, None)


def checked_source(plan: Plan, source: Any) -> Mapping[str, torch.Tensor]:
    """The source's tensors, after checking they are the ones the plan was made for."""
    import torch

    tensors = tensors_of(source)
    expected = {e.source: e for e in plan.sources}
    problems = [
        f"{k}: in the source, not in the plan" for k in sorted(set(tensors) - set(expected))
    ]
    problems += [
        f"{k}: in the plan, not in the source" for k in sorted(set(expected) - set(tensors))
    ]
    if isinstance(source, Mapping):  # a checkpoint's shapes are its header's, already planned
        for entry in plan.sources:
            tensor = tensors.get(entry.source)
            if tensor is None:
                continue
            if not isinstance(tensor, torch.Tensor):
                problems.append(f"{entry.source}: a {type(tensor).__name__}, not a tensor")
            elif list(tensor.shape) != entry.shape:
                problems.append(
                    f"{entry.source}: shape {list(tensor.shape)}, the plan was made for {entry.shape}"
                )
    if problems:
        raise LoadError(
            "the source does not match the plan it is applied with",
            code="CKM402",
            details=summarize(problems),
            hint="make the plan from this source: program.plan(source, target)",
        )
    return tensors


def stream_into(
    model: torch.nn.Module,
    plan: Plan,
    tensors: Mapping[str, torch.Tensor],
    metadata: dict,
    checkpoint: Checkpoint | None = None,
    transactional: bool = True,
) -> None:
    """Load module by module, the way `load_state_dict` walks the model (each module's own
    `_load_from_state_dict` and hooks run), reading each tensor only when its module's turn
    comes: no whole state_dict is ever held.

    All or nothing: before a module's tensors are written, the tensor objects and (when
    `transactional`) what they hold are kept; whatever fails afterwards, the model's own
    code or a `KeyboardInterrupt` included, puts every one of them back."""
    token = LOADING.set(True)  # the model's hooks run; ckptmap's own upgrade hook stands by
    try:
        _ModelLoad(model, plan, tensors, metadata, checkpoint, transactional).run()
    finally:
        LOADING.reset(token)


class _ModelLoad:
    """One plan streamed into one model, with what it takes to undo it."""

    def __init__(self, model, plan, tensors, metadata, checkpoint, transactional):
        self.model, self.metadata, self.transactional = model, metadata, transactional
        self.loaded = {o.target: o.value for o in plan.outputs if o.status == "loaded"}
        self.direct = _direct_reads(model, plan, self.loaded, checkpoint)
        self.evaluator = Evaluator(
            plan,
            tensors.__getitem__,
            [v for k, v in self.loaded.items() if k not in self.direct],
            raw=checkpoint.raw if checkpoint is not None else None,
        )
        self.errors: list[str] = []
        self.unexpected: list[str] = []
        self.done: set[str] = set()
        # (module's dict, name, tensor object, a copy of what it held, or the storage it had)
        self.undo: list[tuple[dict, str, Any, Any, Any]] = []
        self.at = {"module": "", "key": ""}  # where the walk is, for an error's message
        self.shared = _shared_storages(model) if transactional else set()
        self.kept: set[tuple[int, str]] = set()  # (id of the module's dict, name) kept once

    def run(self) -> None:
        import torch

        try:
            with torch.no_grad():
                self.load(self.model, "")
            left = sorted(set(self.loaded) - self.done)
            if self.errors or self.unexpected or left:
                raise LoadError(
                    "the model refused what the plan sent it"
                    + ("; the model is as it was" if self.transactional else ""),
                    code="CKM404",
                    details=summarize(
                        [*self.errors, *self.unexpected, *(f"{k}: never reached" for k in left)]
                    ),
                )
        except BaseException as e:
            _put_back(self.undo)
            if isinstance(e, CkptmapError) or not isinstance(e, Exception):
                raise  # ours, or KeyboardInterrupt / SystemExit: as they are, after the undo
            module = self.at["module"][:-1] or "the model"
            key = self.at["key"]
            where = f"module {module!r}" + (f", tensor {key!r}" if key else "")
            raise LoadError(
                f"loading failed in {where}: {type(e).__name__}: {e}"
                + (
                    "; the model is as it was"
                    if self.transactional
                    else "; the model may be partly loaded"
                ),
                code="CKM405",
            ) from e

    def load(self, module: Any, prefix: str) -> None:
        from torch.nn.modules.module import _IncompatibleKeys

        self.at["module"], self.at["key"] = prefix, ""
        own = [
            *module._parameters,
            *(b for b in module._buffers if b not in module._non_persistent_buffers_set),
        ]
        mine = [n for n in own if prefix + n in self.loaded and prefix + n not in self.done]
        if self.transactional and not _plain(module):
            # its own code may write anything of its subtree, loaded by the plan or not
            for sub in module.modules():
                for name in [*sub._parameters, *sub._buffers]:
                    self.keep(sub, name)
        local = self.fill(module, prefix, mine)
        self.at["key"] = ""
        module._load_from_state_dict(
            local,
            prefix,
            self.metadata.get(prefix[:-1], {}),
            True,
            [],
            self.unexpected,
            self.errors,
        )  # keys filled in place count as missing here: the plan accounts for them
        del local
        for name, child in module._modules.items():
            if child is not None:
                self.load(child, f"{prefix}{name}.")
        self.at["module"], self.at["key"] = prefix, ""
        for hook in module._load_state_dict_post_hooks.values():
            said = _IncompatibleKeys([], [])
            hook(module, said)
            self.errors += [f"{prefix}: a load hook says {k} is missing" for k in said.missing_keys]
            self.errors += [
                f"{prefix}: a load hook says {k} is unexpected" for k in said.unexpected_keys
            ]

    def fill(self, module: Any, prefix: str, mine: list[str]) -> dict:
        """Read this module's own tensors: straight from the file where it can (swapped in
        fresh, or in place), else through the evaluator for its `_load_from_state_dict`.
        What each held is kept first."""
        import torch

        swapped = {n for n in mine if self.swappable(module, prefix + n, n)}
        for name in mine:  # before anything can write them
            if name not in swapped:
                self.keep(module, name)
        local = {}
        for name in mine:
            key = self.at["key"] = prefix + name
            if name in swapped:
                store = _store_of(module, name)
                tensor = store[name]
                fresh = torch.empty_like(tensor.detach())
                self.direct[key].read_into(fresh)
                self.undo.append((store, name, tensor, None, tensor.data))
                tensor.data = fresh
            elif key in self.direct:  # a plain module: filled in place, nothing left to copy
                self.direct[key].read_into(getattr(module, name).detach())
            else:
                local[key] = self.evaluator.take(self.loaded[key])
            self.done.add(key)
        return local

    def keep(self, module: Any, name: str) -> None:
        store = _store_of(module, name)
        tensor = store[name]
        if (id(store), name) in self.kept:
            return
        self.kept.add((id(store), name))
        if tensor is not None:
            saved = tensor.detach().clone() if self.transactional else None
            self.undo.append((store, name, tensor, saved, None))

    def swappable(self, module: Any, key: str, name: str) -> bool:
        """A tensor read straight from the file whose storage is its own (no other tensor
        of the model views it): it is read into fresh memory and swapped in, the old storage
        kept as the undo. No copy is made, and memory never written is never read."""
        if not self.transactional or key not in self.direct:
            return False
        t = _store_of(module, name)[name]
        return (
            t is not None
            and t.storage_offset() == 0
            and t.untyped_storage().nbytes() == t.numel() * t.element_size()
            and t.untyped_storage().data_ptr() not in self.shared
        )


def _plain(module: Any) -> bool:
    """A module that loads the way torch's own does: no override, no load hooks."""
    import torch

    return (
        type(module)._load_from_state_dict is torch.nn.Module._load_from_state_dict
        and not module._load_state_dict_pre_hooks
        and not module._load_state_dict_post_hooks
    )


def _store_of(module: Any, name: str) -> dict:
    return module._parameters if name in module._parameters else module._buffers


def _shared_storages(model: Any) -> set[int]:
    """Storages that more than one tensor object of the model uses (views, not one tied
    object): those are written in place, so the views stay views."""
    seen: dict[int, int] = {}
    for t in {id(t): t for t in model.state_dict(keep_vars=True).values()}.values():
        if t.device.type != "meta" and t.numel():
            ptr = t.untyped_storage().data_ptr()
            seen[ptr] = seen.get(ptr, 0) + 1
    return {ptr for ptr, count in seen.items() if count > 1}


def _direct_reads(model: Any, plan: Plan, loaded: dict[str, int], checkpoint: Any) -> dict:
    """A renamed tensor of the right dtype is read from the file straight into the model's
    own memory, no temporary tensor at all: which keys, and where their bytes lie."""

    if checkpoint is None:
        return {}
    leaves = {e.value: e for e in plan.sources}
    state = model.state_dict(keep_vars=True)
    # only into modules that load the plain way: no override, no load hooks
    plain = {prefix for prefix, m in model.named_modules(remove_duplicate=False) if _plain(m)}
    direct = {}
    for key, value in loaded.items():
        if key.rpartition(".")[0] not in plain:
            continue
        entry, dst = leaves.get(value), state.get(key)
        if (
            entry is not None
            and dst is not None
            and dst.device.type == "cpu"
            and dst.is_contiguous()
            and str(dst.dtype) == f"torch.{entry.dtype}"
            and list(dst.shape) == entry.shape
        ):
            raw = checkpoint.raw(entry.source)
            if raw is not None:
                direct[key] = raw
    return direct


def refuse_unloadable(plan: Plan, source: Any, tensors: Mapping[str, torch.Tensor]) -> None:
    """Tensors no model parameter can take as they are (sparse, quantized, meta, nested),
    refused before anything is written. Safetensors files hold none of these."""
    from .io import Checkpoint
    from .io.torchfile import TorchCheckpoint

    if isinstance(source, Checkpoint) and not isinstance(source, TorchCheckpoint):
        return
    if isinstance(source, TorchCheckpoint):
        tensors = source.state
    bad = []
    for e in plan.sources:
        if e.status != "loaded":
            continue
        t = tensors.get(e.source)
        why = _unloadable(t) if t is not None else None
        if why:
            bad.append(f"{e.source}: {why}")
    if bad:
        raise LoadError(
            "the source holds tensors a model cannot load as they are; nothing was written",
            code="CKM406",
            details=summarize(bad),
            hint="convert them first (t.to_dense(), t.dequantize()), or skip them",
        )


def _unloadable(t: Any) -> str | None:
    import torch

    if not isinstance(t, torch.Tensor):
        return f"a {type(t).__name__}, not a tensor"
    if t.layout != torch.strided:
        return f"a {str(t.layout).removeprefix('torch.')} tensor"
    if t.is_quantized:
        return f"a quantized tensor ({str(t.dtype).removeprefix('torch.')})"
    if t.is_meta:
        return "a meta tensor: it has no values"
    if t.is_nested:
        return "a nested tensor"
    return None


def refuse_oversized(plan: Plan) -> None:
    """Every tensor the plan would hold (read, made or kept) must fit in this machine's
    memory: a rule like `pad(0, 0, 10**15)` or a file claiming a terabyte is refused here,
    not by the allocator halfway through."""
    import math
    import os

    try:
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return
    sizes = [math.prod(v.shape) * itemsize(v.dtype) for v in plan.values]
    if not sizes or max(sizes) <= memory:
        return
    value = max(range(len(sizes)), key=sizes.__getitem__)
    names = [o.target for o in plan.outputs if o.value == value]
    names += [e.source for e in plan.sources if e.value == value]
    step = next((st for st in plan.steps if value in st.outputs), None)
    what = (
        names[0] if names else f"a tensor made by {plan.rules[step.rule]}" if step else "a tensor"
    )
    raise LoadError(
        f"{what} {plan.values[value].shape} needs {sizes[value]:,} bytes; this machine has "
        f"{memory:,}",
        code="CKM407",
    )


def _put_back(undo: list) -> None:
    """Every tensor object back in its module, holding what it held before (last first)."""
    import torch

    with torch.no_grad():
        for store, name, tensor, saved, storage in reversed(undo):
            store[name] = tensor
            if storage is not None:  # read into fresh memory: the old storage goes back
                tensor.data = storage
            elif saved is None:
                continue
            elif tensor.shape == saved.shape and tensor.dtype == saved.dtype:
                tensor.copy_(saved)
            else:  # code that swapped the tensor's storage or shape: give the old one back
                tensor.data = saved


@needs_torch("Plan.apply")
def apply_plan(plan: Plan, source: Any) -> dict[str, torch.Tensor]:
    """The mapped state_dict. Renames hand back the source's own tensor objects (no copy)."""
    import torch

    plan.check()
    refuse_oversized(plan)
    tensors = checked_source(plan, source)
    loaded = [o for o in plan.outputs if o.status == "loaded"]
    evaluator = Evaluator(plan, tensors.__getitem__, [o.value for o in loaded])
    with torch.no_grad():
        return {o.target: evaluator.take(o.value) for o in loaded}


@needs_torch("writing this plan's output (tensor transforms, .pt files)")
def write_plan(
    plan: Plan,
    checkpoint: Checkpoint,
    out: Path,
    *,
    metadata: dict[str, str],
    max_shard_size: int | None = None,
    on_bytes: Callable[[int], None] | None = None,
    overwrite: bool = False,
) -> list[Path]:
    """Execute a plan file to file: each tensor is read, written and released in turn.

    Tensors that were tied in the source (one tensor under several names) are
    stored once and tied again when the output is read.
    """
    from .io.write import save_checkpoint

    plan.check()
    refuse_oversized(plan)
    meta = checkpoint.meta()
    _refuse_other_checkpoint(plan, meta)
    loaded = [o for o in plan.outputs if o.status == "loaded"]
    by_value = {e.value: e.source for e in plan.sources}
    aliases = _aliases(loaded, by_value, checkpoint.ties(), meta)
    value_of = {o.target: o.value for o in loaded}
    # a renamed tensor going to safetensors is copied byte for byte, never decoded
    raw: dict[str, RawBytes] = {}
    if Path(out).suffix == ".safetensors" or max_shard_size is not None:
        for o in loaded:
            if o.value in by_value and o.target not in aliases:
                source = by_value[o.value]
                if o.dtype and meta[source].dtype and o.dtype != meta[source].dtype:
                    raise LoadError(  # the bytes would be copied under another dtype's header
                        f"{o.target}: the plan says {o.dtype}, its source {source} is "
                        f"{meta[source].dtype}",
                        code="CKM402",
                    )
                piece = checkpoint.raw(source)
                if piece is not None:
                    raw[o.target] = piece
    computed = [o.value for o in loaded if o.target not in aliases and o.target not in raw]
    evaluator = Evaluator(plan, checkpoint.get, computed, checkpoint.done, checkpoint.raw)
    items = [
        (o.target, TensorMeta(tuple(o.shape), o.dtype or meta[o.sources[0]].dtype)) for o in loaded
    ]
    # tensors copied as they are go first, in the order they lie in the source: runs of them
    # are copied as single ranges that keep their block alignment; computed ones follow
    items.sort(
        key=lambda item: (
            (0, str(raw[item[0]].path), raw[item[0]].offset) if item[0] in raw else (1, "", 0)
        )
    )
    # torch is needed only when a tensor is computed; a pure rename never imports it
    torch = sys.modules.get("torch")
    with torch.no_grad() if torch is not None and computed else contextlib.nullcontext():
        return save_checkpoint(
            out,
            items,
            lambda name: raw[name] if name in raw else evaluator.take(value_of[name]),
            metadata=metadata,
            aliases=aliases,
            max_shard_size=max_shard_size,
            on_bytes=on_bytes,
            overwrite=overwrite,
            keep=[checkpoint.path, *checkpoint.files],
        )


def _refuse_other_checkpoint(plan: Plan, meta: dict) -> None:
    """The checkpoint must hold what the plan was made for: names, shapes and dtypes."""
    problems = [f"{e.source}: not in the checkpoint" for e in plan.sources if e.source not in meta]
    problems += [
        f"{e.source}: the checkpoint has {list(meta[e.source].shape)}, the plan {e.shape}"
        for e in plan.sources
        if e.source in meta and list(meta[e.source].shape) != e.shape
    ]
    problems += [  # bytes are copied as they are: a dtype the plan did not see would be garbage
        f"{e.source}: the checkpoint has {meta[e.source].dtype}, the plan {e.dtype}"
        for e in plan.sources
        if e.source in meta and e.dtype and meta[e.source].dtype and meta[e.source].dtype != e.dtype
    ]
    if problems:  # keys the plan does not use may stay behind (a reversed plan's new head)
        raise LoadError(
            "the checkpoint does not match the plan",
            code="CKM402",
            details=summarize(problems),
            hint="make the plan from this checkpoint, or cast it to the plan's dtypes first",
        )


def _aliases(loaded: list, by_value: dict, ties: dict, meta: dict) -> dict[str, str]:
    """Tied sources passed through unchanged are stored once, under the name given first:
    {alias: stored name}."""
    order = {name: i for i, name in enumerate(meta)}
    renamed = {by_value[o.value]: o.target for o in loaded if o.value in by_value}
    aliases = {}
    for source, target in renamed.items():
        group = sorted((s for s in ties.get(source, ()) if s in renamed), key=order.__getitem__)
        if group and renamed[group[0]] != target:
            aliases[target] = renamed[group[0]]
    return aliases
