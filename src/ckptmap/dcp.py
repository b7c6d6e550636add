"""ckptmap's rules in torch.distributed.checkpoint: `LoadPlanner(rules)` is what `dcp.load`
takes as its `planner`.

    import torch.distributed.checkpoint as dcp
    from ckptmap.dcp import LoadPlanner

    dcp.load(model.state_dict(), storage_reader=dcp.FileSystemReader(path),
             planner=LoadPlanner('strip "module."\\nrename "layers" -> "blocks"'))

The rules are planned from the checkpoint's metadata and the state_dict's (global) shapes,
on every rank alike, before any byte is read. Renamed tensors go to DCP's own planner
under the names the checkpoint has, the same tensor objects: DCP intersects each rank's
shards with the checkpoint's chunks. A tensor computed by ops is read as the boxes of its
sources that this rank's box of it is made of (`regions.py`: a fuse reads the rows of
q, k and v its shard covers, a transpose the transposed box); an op that needs its input
whole for that box (a RoPE permutation of some of the rows) reads it whole, computes,
then cuts, never converting a slice.

`load`, `load_into` (through `load_sharded`) and `save` are the front doors: they agree
across ranks before anything is read or written (a problem on one rank is the same
error on every rank) and stage what they load, so a model is as it was when anything
fails. This module imports torch.distributed: `import ckptmap` does not load it.
"""

from __future__ import annotations

import dataclasses
import math
import os
import shutil
import tempfile
import threading
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

try:
    import torch
except ModuleNotFoundError:  # `import ckptmap.dcp` says what to install, in one line
    from .errors import torch_missing

    raise torch_missing("ckptmap.dcp") from None
import torch.distributed as dist
from torch.distributed.checkpoint import (
    FileSystemReader,
    FileSystemWriter,
    HuggingFaceStorageReader,
    StorageReader,
)
from torch.distributed.checkpoint import load as dcp_load
from torch.distributed.checkpoint import save as dcp_save
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, MetadataIndex
from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list
from torch.distributed.tensor import DTensor

from .apply import Evaluator, _plain, apply_plan, checked_source, opened, refuse_unloadable
from .compile import compile
from .errors import CheckpointError, CkptmapError, LoadError, UsageError
from .io import open_checkpoint
from .io.dcp import DcpCheckpoint, _quiet, is_dcp, tensors_in
from .io.write import _publish_folder, _umask, check_destination, save_checkpoint
from .meta import TensorMeta, local_piece, meta_of
from .plan import Plan
from .regions import Box, Recipes, cut, evaluate, is_empty, reads, whole, whole_reads

__all__ = ["LoadPlanner", "StateDictAdapter", "load", "reader", "save"]

# the state_dict name of a box ckptmap reads to compute from: never a real tensor's name
_MINE = "\x00ckptmap/"


# --- one rank's view --------------------------------------------------------------------------


def _local(tensor: torch.Tensor) -> tuple[Box, torch.Tensor]:
    """The box of `tensor` this rank holds (global offsets and sizes), and its data."""
    if hasattr(tensor, "__create_chunk_list__"):  # a DTensor
        chunks = tensor.__create_chunk_list__()
        if len(chunks) != 1:
            raise LoadError(
                f"a DTensor of {len(chunks)} local pieces is not supported", code="CKM409"
            )
        c = chunks[0]
        return (tuple(c.offsets), tuple(c.sizes)), local_piece(tensor)
    return whole(tensor.shape), tensor


def _world() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _agree(step: Callable[[], Any]) -> Any:
    """Run `step` on every rank; when it fails on any, every rank raises the same error
    (the lowest failing rank's, naming it) before anything is read or written."""
    error: CkptmapError | None = None
    result = None
    try:
        result = step()
    except CkptmapError as e:
        error = e
    except Exception as e:  # said on every rank, or the others would wait for it forever
        error = LoadError(f"{type(e).__name__}: {e}", code="CKM410")
    if _world() == 1:
        if error is not None:
            raise error
        return result
    errors: list[Any] = [None] * _world()
    dist.all_gather_object(errors, error)
    for rank, failed in enumerate(errors):
        if failed is not None:
            failed.details = [*failed.details, f"(raised on rank {rank} of {len(errors)})"]
            raise failed
    return result


def _metas(state_dict: Mapping[str, Any]) -> dict[str, TensorMeta]:
    """A state_dict's tensors: names, global shapes (a DTensor's whole shape) and dtypes;
    its other entries (a step count, optimizer state) are DCP's to carry."""
    tensors = {k: v for k, v in state_dict.items() if isinstance(v, torch.Tensor)}
    return meta_of(tensors, "state_dict")


# --- the planner ------------------------------------------------------------------------------


@dataclasses.dataclass(eq=False)
class _Group:
    """One computed tensor's box on this rank: what it is made of, and what is still unread."""

    target: str
    dest: torch.Tensor  # this rank's data of the target, where the box goes
    node: Any
    buffers: dict[int, torch.Tensor]  # by id of the Read
    keys: list[str]
    pending: int = 0


class LoadPlanner(DefaultLoadPlanner):
    """A DCP load planner that reads a checkpoint under ckptmap's rules.

    `rules` as everywhere (rule text, a Path, a Ruleset, a Program) or a `Plan` made for
    this checkpoint and state_dict. After `set_up_planner` (what DCP calls first), `plan`
    is the ckptmap Plan; after `create_local_plan`, `bytes_read` is what this rank asks to
    read (its pieces of every tensor) and `bytes_whole` the part of it read whole because
    an op needs its input so.
    """

    def __init__(self, rules: Any, *, allow_partial_load: bool = False) -> None:
        super().__init__(allow_partial_load=allow_partial_load)
        self._given = rules if isinstance(rules, Plan) else None
        self.program = None if self._given is not None else compile(rules)
        self.plan: Any = None
        self.bytes_read = 0
        self.bytes_whole = 0
        self._md: Any = None
        self._computed: list[tuple[Any, torch.Tensor]] = []
        self._groups: dict[str, tuple[_Group, torch.Tensor | None]] = {}
        self._lock = threading.Lock()

    def set_up_planner(
        self, state_dict: dict[str, Any], metadata: Any = None, is_coordinator: bool = False
    ) -> None:
        renamed = self.prepare(state_dict, metadata)
        super().set_up_planner(renamed, metadata, is_coordinator)

    def prepare(self, state_dict: dict[str, Any], metadata: Any) -> dict[str, Any]:
        """Plan the rules from the checkpoint's metadata onto the state_dict (raising the
        plan's problems), and return the renamed part of the state_dict under the
        checkpoint's names; the computed part is kept for `create_local_plan`."""
        if metadata is None:
            raise UsageError("the ckptmap LoadPlanner plans from the checkpoint's metadata")
        source, target = tensors_in(metadata)[0], _metas(state_dict)
        plan = self._plan_for(source, target).check()
        self.plan, self._md = plan, metadata
        by_value = {e.value: e.source for e in plan.sources}
        renamed: dict[str, Any] = {}
        self._computed = []
        for o in plan.outputs:
            if o.status != "loaded":
                continue
            if o.value in by_value and by_value[o.value] not in renamed:
                renamed[by_value[o.value]] = state_dict[o.target]
            else:  # made by ops, or a second name for one source: read as boxes
                self._computed.append((o, state_dict[o.target]))
        return renamed

    def _plan_for(self, source: dict[str, TensorMeta], target: dict[str, TensorMeta]) -> Plan:
        if self.program is not None:
            return self.program.plan(source, target)
        plan = self._given
        assert plan is not None
        wrong = [
            e.source
            for e in plan.sources
            if e.source not in source or list(source[e.source].shape) != e.shape
        ]
        wrong += [
            o.target
            for o in plan.outputs
            if o.status == "loaded"
            and (o.target not in target or list(target[o.target].shape) != o.shape)
        ]
        if wrong:
            raise LoadError(
                f"the plan was made for another checkpoint or state_dict: {', '.join(wrong[:3])}"
                f"{' …' if len(wrong) > 3 else ''} differ",
                code="CKM411",
            )
        return plan

    def create_local_plan(self) -> Any:
        local = super().create_local_plan()
        items = list(local.items)
        self.bytes_read, self.bytes_whole = self._bytes(items), 0
        self._groups = {}
        recipes = Recipes(self.plan)
        for output, tensor in self._computed:
            box, data = _local(tensor)
            if is_empty(box):
                continue
            group = _Group(output.target, data, recipes.of(output.value, box), {}, [])
            items += self._reads_of(group)
        return dataclasses.replace(local, items=items)

    def _reads_of(self, group: _Group) -> list[Any]:
        items: list[Any] = []
        fallback = {id(r) for r in whole_reads(group.node)}
        for r in reads(group.node):
            md: Any = self._md.state_dict_metadata[r.source]
            group.buffers[id(r)] = buffer = torch.empty(r.box[1], dtype=md.properties.dtype)
            if is_empty(r.box):
                continue
            key = f"{_MINE}{len(self._groups)}"
            group.keys.append(key)
            self._groups[key] = (group, buffer)
            chunk = ChunkStorageMetadata(offsets=torch.Size(r.box[0]), sizes=torch.Size(r.box[1]))
            found = create_read_items_for_chunk_list(r.source, md, [chunk])
            n = self._bytes(found)
            self.bytes_read += n
            self.bytes_whole += n if id(r) in fallback else 0
            group.pending += len(found)
            items += [
                dataclasses.replace(i, dest_index=MetadataIndex(key, r.box[0], 0)) for i in found
            ]
        if not group.keys:  # nothing to read (a fill): computed when the plan is final
            self._groups[f"{_MINE}{len(self._groups)}"] = (group, None)
        return items

    def _bytes(self, items: list[Any]) -> int:
        sd: Any = self._md.state_dict_metadata
        return sum(
            math.prod(i.lengths) * sd[i.storage_index.fqn].properties.dtype.itemsize
            for i in items
            if getattr(sd.get(i.storage_index.fqn), "properties", None) is not None
        )

    def finish_plan(self, new_plan: Any) -> Any:
        new_plan = super().finish_plan(new_plan)
        for group, buffer in list(self._groups.values()):
            if buffer is None:
                self._finish(group)
        return new_plan

    def resolve_tensor(self, read_item: Any) -> Any:
        key = read_item.dest_index.fqn
        if not key.startswith(_MINE):
            return super().resolve_tensor(read_item)
        buffer = self._groups[key][1]
        assert buffer is not None  # only boxes that are read have keys DCP sees
        return cut(buffer, (tuple(read_item.dest_offsets), tuple(read_item.lengths)))

    def commit_tensor(self, read_item: Any, tensor: Any) -> None:
        key = read_item.dest_index.fqn
        if not key.startswith(_MINE):
            return super().commit_tensor(read_item, tensor)
        group = self._groups[key][0]
        with self._lock:
            group.pending -= 1
            ready = group.pending == 0
        if ready:
            self._finish(group)
        return None

    def _finish(self, group: _Group) -> None:
        by_read = dict(group.buffers)
        with torch.no_grad():
            group.dest.copy_(evaluate(group.node, lambda r: by_read[id(r)]))
        group.buffers.clear()
        for key in group.keys:
            self._groups.pop(key, None)


# --- readers ----------------------------------------------------------------------------------


class _Listed:
    """A DCP file system that lists only the given files (a safetensors file of a folder,
    or the shards a Hugging Face index names), for DCP's HuggingFaceStorageReader."""

    def __init__(self, fs: Any, files: list[str]) -> None:
        self._fs, self._files = fs, files

    def ls(self, path: Any) -> list[str]:
        return list(self._files)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._fs, name)


def reader(checkpoint: Any) -> StorageReader:
    """DCP's own reader of a checkpoint: `FileSystemReader` for a DCP folder,
    `HuggingFaceStorageReader` (slices of each tensor, read in place) for a safetensors
    file or a Hugging Face folder. A StorageReader is taken as it is."""
    if isinstance(checkpoint, StorageReader):
        return checkpoint
    path = Path(checkpoint).resolve()
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or directory", code="CKM501")
    if path.is_dir() and is_dcp(path):
        return FileSystemReader(str(path))
    files: list[Path] = []
    if path.is_file() and path.suffix == ".safetensors":
        files = [path]
    elif path.is_dir():
        files = [f for f in open_checkpoint(path).files if f.suffix == ".safetensors"]
    if not files:
        raise LoadError(
            f"{path}: a sharded load reads its pieces from a DCP folder, a safetensors file "
            "or a Hugging Face folder of them, not from this",
            code="CKM409",
            hint=f"convert it once: ckptmap apply RULES -s {path.name} -o model.safetensors",
        )
    hf = HuggingFaceStorageReader(str(files[0].parent))
    hf.fs = _Listed(hf.fs, [str(f) for f in files])  # type: ignore[assignment]
    return hf


# --- front doors ------------------------------------------------------------------------------


def load(state_dict: dict[str, Any], checkpoint: Any, rules: Any) -> Any:
    """`dcp.load` of `checkpoint` (a DCP folder, a safetensors file, a Hugging Face folder
    or a StorageReader) into `state_dict` under the rules, in place: validated first on
    every rank, so a problem is ckptmap's own error, the same on every rank, before any
    byte is read (inside `dcp.load` DCP wraps a planner's error in its
    CheckpointException). Returns the ckptmap Plan; `ckptmap.load_into` on a sharded model
    also stages what it reads, so the model is as it was when reading fails."""
    first = LoadPlanner(rules)

    def planned() -> Any:
        storage = reader(checkpoint)
        first.prepare(state_dict, storage.read_metadata())
        return storage

    with _quiet():
        storage = _agree(planned)
        _read(state_dict, storage, LoadPlanner(first.plan))  # planned once: only checked again
    return first.plan


def _read(state_dict: dict[str, Any], storage: Any, planner: LoadPlanner) -> None:
    try:
        dcp_load(state_dict, storage_reader=storage, planner=planner, no_dist=_world() == 1)
    except CheckpointException as e:  # the same on every rank: DCP gathered the failures
        failures = getattr(e, "failures", {}) or {}
        first = min(failures) if failures else None
        cause = failures[first] if first is not None else e
        if isinstance(cause, tuple):  # DCP keeps (exception, traceback summary)
            cause = cause[0]
        said = f"rank {first}: {type(cause).__name__}: {cause}" if first is not None else str(e)
        raise LoadError(f"reading the checkpoint failed ({said[:300]})", code="CKM410") from None


def load_sharded(model: torch.nn.Module, source: Any, plan_of: Callable[[Any], Plan]) -> Plan:
    """`load_into` for a model with DTensor parameters (FSDP2, tensor parallel): each rank
    reads the boxes of its own shards (a DCP folder, a safetensors file or a Hugging Face
    folder through DCP's readers; a state_dict of whole tensors is cut in memory), staged,
    and put in once every rank has read all of its part. Every step that can fail is
    agreed on: a failure on any rank is the same error on every rank, the model as it was."""
    state = model.state_dict(keep_vars=True)
    if isinstance(source, Mapping):
        plan, staged = _agree(lambda: _cut_in_memory(source, plan_of, state))
    else:

        def planned() -> tuple[Plan, Any]:
            storage = reader(source)
            plan = plan_of(opened(source))  # its warnings are the user's: not quieted
            with _quiet():
                LoadPlanner(plan).prepare(state, storage.read_metadata())  # the reader agrees
            return plan, storage

        plan, storage = _agree(planned)
        loaded = [o.target for o in plan.outputs if o.status == "loaded"]
        fresh = {k: torch.empty_like(state[k].detach()) for k in loaded}
        with _quiet():
            _read(fresh, storage, LoadPlanner(plan))
        staged = {k: _local(t)[1] for k, t in fresh.items()}
    _put_in(model, state, staged)
    return plan


def _cut_in_memory(source: Mapping, plan_of: Callable[[Any], Plan], state: dict) -> Any:
    """From a state_dict of whole tensors (the same on every rank): each rank's boxes,
    copied out (a source that is the model's own tensors stays as it was)."""
    plan = plan_of(source)
    given = [k for k, v in source.items() if hasattr(v, "to_local")]
    if given:
        raise LoadError(
            f"{given[0]} (and {len(given) - 1} more) in the source is a DTensor: a sharded "
            "load takes whole tensors, or a checkpoint on disk",
            code="CKM409",
            hint="save the sharded state_dict with dcp.save and load that folder",
        )
    refuse_unloadable(plan, source, checked_source(plan, source))
    made = apply_plan(plan, source)
    return plan, {k: cut(t, _local(state[k])[0]).clone() for k, t in made.items()}


def _put_in(model: torch.nn.Module, state: dict, staged: dict[str, torch.Tensor]) -> None:
    """The staged pieces into the model. A model whose modules load their own way (an
    override of `_load_from_state_dict`, load hooks, FSDP2's) on any rank is given them
    through `load_state_dict` on every rank, as on one process: what a hook says is
    missing or unexpected is refused (CKM404), and if anything fails on any rank, every
    rank puts back all it held in those modules, loaded by the plan or not."""
    if _everywhere(all(_plain(m) for m in model.modules())):
        with torch.no_grad():
            for name, tensor in staged.items():
                _local(state[name])[1].copy_(tensor)
        return
    kept = {id(state[name]): state[name] for name in staged}
    for module in model.modules():
        if not _plain(module):  # its own code may write anything of its subtree
            kept.update((id(t), t) for t in (*module.parameters(), *module.buffers()))
    old = [(_local(t)[1], _local(t)[1].clone()) for t in kept.values()]
    values = {name: _as_placed(piece, state[name]) for name, piece in staged.items()}
    natural = set(state) - set(values)  # not loaded by the plan: missing by design

    def load() -> None:
        try:
            said = model.load_state_dict(values, strict=False)
        except Exception as e:
            raise LoadError(
                f"loading failed in the model's own code ({type(e).__name__}: {str(e)[:200]})",
                code="CKM405",
            ) from None
        refused = [f"{k} is missing" for k in said.missing_keys if k not in natural]
        refused += [f"{k} is unexpected" for k in said.unexpected_keys]
        if refused:
            raise LoadError(
                f"the model refused what the plan sent it: its load code says {refused[0]}"
                f"{f' (and {len(refused) - 1} more)' if len(refused) > 1 else ''}; the model "
                "is as it was",
                code="CKM404",
            )

    try:
        _agree(load)
    except CkptmapError:
        with torch.no_grad():
            for data, piece in old:
                data.copy_(piece)
        raise


def _as_placed(piece: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """This rank's piece as a DTensor placed like the model's (no communication)."""
    if not isinstance(like, DTensor):
        return piece
    return DTensor.from_local(
        piece,
        like.device_mesh,
        like.placements,
        run_check=False,
        shape=like.shape,
        stride=like.stride(),
    )


def _everywhere(flag: bool) -> bool:
    """True when `flag` is true on every rank (a choice every rank then makes alike)."""
    if _world() == 1:
        return flag
    flags: list[Any] = [None] * _world()
    dist.all_gather_object(flags, flag)
    return all(flags)


def save(
    state_dict: dict[str, Any] | torch.nn.Module,
    out: Any,
    rules: Any,
    source: Any,
    *,
    max_shard_size: int | None = None,
    overwrite: bool = False,
) -> Plan:
    """Write a (sharded) model or state_dict back under the names `rules` map from (a
    model's tied parameters are known by identity, a state_dict's by storage): `source` is
    that checkpoint (a path) or its `{name: shape}`. The rules' plan from `source` onto
    the state_dict, inverted entry by entry, renames each rank's DTensors (tensors made by
    ops are gathered whole first); DCP's `FileSystemWriter` writes each rank's pieces into
    a temporary DCP folder beside `out`, and rank 0 then writes `out` from it atomically:
    one safetensors file, a Hugging Face folder (`max_shard_size`), or `NAME.dcp` as it
    is. Every rank calls it; the file system is shared. Returns the inverted Plan."""
    out = Path(out)
    if max_shard_size is not None and max_shard_size <= 0:
        raise UsageError(f"max_shard_size is a number of bytes above 0, not {max_shard_size}")

    def planned() -> Plan:
        check_destination(out, sharded=max_shard_size is not None, overwrite=overwrite)
        forward = compile(rules).plan(source, given).check()
        return forward.inverse()

    given = state_dict
    tensors = state_dict.state_dict() if isinstance(state_dict, torch.nn.Module) else state_dict
    back = _agree(planned)
    renamed = _renamed(back, tensors)
    tmp = _shared_folder(out)
    try:
        with _quiet():
            dcp_save(
                renamed,
                storage_writer=FileSystemWriter(str(tmp), sync_files=True),
                no_dist=_world() == 1,
            )
        _agree(lambda: _publish(tmp, out, back, max_shard_size, overwrite) if _rank() == 0 else 0)
    finally:
        if _rank() == 0 and tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return back


def _rank() -> int:
    return dist.get_rank() if _world() > 1 else 0


def _renamed(plan: Plan, state_dict: dict[str, Any]) -> dict[str, Any]:
    """The state_dict under the plan's output names: renamed tensors are the same objects
    (each rank's shards); a tensor made by ops is computed from its sources gathered whole
    (the same on every rank: DCP writes it once)."""
    by_value = {e.value: e.source for e in plan.sources}
    loaded = [o for o in plan.outputs if o.status == "loaded"]
    out = {o.target: state_dict[by_value[o.value]] for o in loaded if o.value in by_value}
    computed = [o for o in loaded if o.value not in by_value]

    def gathered(name: str) -> torch.Tensor:
        t = state_dict[name]
        return t.full_tensor() if hasattr(t, "full_tensor") else t

    evaluator = Evaluator(plan, gathered, [o.value for o in computed])
    with torch.no_grad():
        for o in computed:
            out[o.target] = evaluator.take(o.value).clone()
    return out


def _shared_folder(out: Path) -> Path:
    """A temporary folder beside `out`, named by rank 0 for every rank."""
    name = [""]
    if _rank() == 0:
        out.parent.mkdir(parents=True, exist_ok=True)
        name[0] = tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent)
    if _world() > 1:
        dist.broadcast_object_list(name, src=0)
    return Path(name[0])


def _publish(tmp: Path, out: Path, plan: Plan, max_shard_size: int | None, overwrite: bool) -> int:
    """Rank 0: `out` from the DCP folder every rank wrote its pieces into."""
    if out.suffix == ".dcp":
        os.chmod(tmp, 0o777 & ~_umask())  # an output's permissions, not a temporary's
        _publish_folder(tmp, out)
        return 0
    ckpt = DcpCheckpoint(tmp)
    metadata = {
        "ckptmap.rules_fingerprint": plan.rules_fingerprint,
        "ckptmap.plan_fingerprint": plan.fingerprint,
    }
    items = sorted(ckpt.meta().items())
    save_checkpoint(
        out,
        items,
        ckpt.get,
        metadata=metadata,
        max_shard_size=max_shard_size,
        overwrite=overwrite,
    )
    return 0


class StateDictAdapter:
    """The `from_hf` / `to_hf` pair a training framework (torchtitan's `StateDictAdapter`)
    hand-writes, made from rules that map Hugging Face names onto the model's:

        adapter = StateDictAdapter(Path("rules/hf-llama-to-blocks.ckmap"))
        state = adapter.from_hf(hf_state_dict)   # renamed: the same tensor objects (DTensors too)
        hf = adapter.to_hf(state)                # the plan inverted, entry by entry

    `to_hf` inverts the plan the last `from_hf` made, or one made from `hf_keys` (a
    checkpoint path or `{name: shape}`) when `to_hf` comes first."""

    def __init__(self, rules: Any, hf_keys: Any = None) -> None:
        self.program = compile(rules)
        self.hf_keys = hf_keys
        self._forward: Any = None

    def from_hf(self, hf_state_dict: dict[str, Any]) -> dict[str, Any]:
        plan = self.program.plan(hf_state_dict)
        plan.check()
        self._forward = plan
        return plan.apply(hf_state_dict)

    def to_hf(self, state_dict: dict[str, Any]) -> dict[str, Any]:
        if self._forward is None:
            if self.hf_keys is None:
                raise UsageError(
                    "to_hf inverts the names from_hf mapped: call from_hf first, or give "
                    "hf_keys (the Hugging Face checkpoint, or its {name: shape})"
                )
            self._forward = self.program.plan(self.hf_keys).check()
        return self._forward.inverse().apply(state_dict)
