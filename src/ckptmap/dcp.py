"""ckptmap's rules in torch.distributed.checkpoint: `LoadPlanner(rules)` is what `dcp.load`
takes as its `planner`.

    import torch.distributed.checkpoint as dcp
    from ckptmap.dcp import LoadPlanner

    dcp.load(model.state_dict(), storage_reader=dcp.FileSystemReader(path),
             planner=LoadPlanner('strip "module."\\nrename "layers" -> "blocks"'))

The rules are planned from the checkpoint's metadata and the state_dict's shapes, on
every rank alike (so a problem is the same `PlanError` on every rank, raised before any
byte is read). The state_dict is then handed to DCP's own planner under the names the
checkpoint has, the same tensor objects: DCP intersects each rank's shards with the
checkpoint's chunks, so each rank reads only the bytes of its own shards. Renames, skip,
init and policies work this way; tensor transforms are not yet supported here.

This module imports torch.distributed: `import ckptmap` does not load it.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner

from .compile import compile
from .errors import LoadError, UsageError
from .io.dcp import _quiet
from .meta import TensorMeta, dtype_name

__all__ = ["LoadPlanner", "StateDictAdapter", "load"]


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


def load(state_dict: dict[str, Any], checkpoint: Any, rules: Any) -> Any:
    """`dcp.load` of a DCP folder into `state_dict` under the rules: validated first, on
    every rank alike, so a problem is raised as ckptmap's own error (a `PlanError`) before
    any byte is read (inside `dcp.load` DCP wraps it in its CheckpointException). Returns
    the ckptmap Plan."""
    import torch.distributed.checkpoint as dcp

    reader = dcp.FileSystemReader(str(checkpoint))
    planner = LoadPlanner(rules)
    with _quiet():
        planner.prepare(state_dict, reader.read_metadata())
        dcp.load(state_dict, storage_reader=reader, planner=planner)
    return planner.plan


class LoadPlanner(DefaultLoadPlanner):
    """A DCP load planner that reads a checkpoint under ckptmap's rules.

    `rules` as everywhere: rule text, a Path, a Ruleset or a Program. `plan` holds the
    ckptmap Plan after `set_up_planner` (what DCP calls first), for its report.
    """

    def __init__(self, rules: Any, *, allow_partial_load: bool = False) -> None:
        super().__init__(allow_partial_load=allow_partial_load)
        self.program = compile(rules)
        self.plan: Any = None

    def set_up_planner(
        self, state_dict: dict[str, Any], metadata: Any = None, is_coordinator: bool = False
    ) -> None:
        renamed = self.prepare(state_dict, metadata)
        super().set_up_planner(renamed, metadata, is_coordinator)

    def prepare(self, state_dict: dict[str, Any], metadata: Any) -> dict[str, Any]:
        """Plan the rules from the checkpoint's metadata onto the state_dict (raising the
        plan's problems), and return the state_dict under the checkpoint's names."""
        if metadata is None:
            raise UsageError("the ckptmap LoadPlanner plans from the checkpoint's metadata")
        source = {
            fqn: TensorMeta(tuple(entry.size), dtype_name(entry.properties.dtype))
            for fqn, entry in metadata.state_dict_metadata.items()
            if getattr(entry, "properties", None) is not None and hasattr(entry, "size")
        }
        target = {
            key: TensorMeta(tuple(value.shape), dtype_name(value.dtype))  # a DTensor's global shape
            for key, value in state_dict.items()
            if isinstance(value, torch.Tensor)
        }
        plan = self.program.plan(source, target)
        plan.check()  # the same on every rank: every rank raises the same error
        by_value = {e.value: e.source for e in plan.sources}
        computed = [
            o.target for o in plan.outputs if o.status == "loaded" and o.value not in by_value
        ]
        if computed:
            raise LoadError(
                f"{len(computed)} tensors are computed by ops ({', '.join(computed[:3])}): a DCP "
                "load maps renames, skip and init; transforms are not yet supported here",
                code="CKM409",
                hint="load with ckptmap.load_into, or convert the checkpoint with ckptmap apply",
            )
        self.plan = plan
        return {
            by_value[o.value]: state_dict[o.target] for o in plan.outputs if o.status == "loaded"
        }
