"""The front doors: rules, a source and a model (or a target) in; validated, loaded or
rewritten, with the Report out. Compile (compile.py), plan (resolve.py), execute
(apply.py)."""

from __future__ import annotations

import sys
import warnings
from typing import TYPE_CHECKING, Any

from .apply import (
    apply_plan,
    checked_source,
    opened,
    refuse_oversized,
    refuse_unloadable,
    stream_into,
)
from .compile import compile
from .errors import LoadError, UsageError, needs_torch
from .history import History
from .meta import local_piece
from .report import render_problems

if TYPE_CHECKING:
    import torch

    from .report import Report


@needs_torch("ckptmap.load_into")
def load_into(
    model: torch.nn.Module,
    source: Any,
    rules: Any,
    *,
    on_mismatch: str | None = None,
    on_missing: str | None = None,
    on_unexpected: str | None = None,
    on_unused: str | None = None,
    transactional: bool = True,
    from_: str | None = None,
) -> Report:
    """Plan, validate, load and freeze, all or nothing; return the Report.

    `source` is a state_dict or a checkpoint path; `rules` a Ruleset, Program,
    rule text or rule file Path, or a `History`: then the source's revision is found
    and it is loaded through the steps up to the revision whose schema the model has
    (head when none has it); `from_` names the source's revision when its stamp and
    schema cannot (a history's steps keep their own policies: `on_…` go with rules).
    When validation fails, `PlanError` is raised
    and the model's tensors and `requires_grad` flags are exactly as before.

    When anything fails during the load itself (a file cut short, a module's own
    `_load_from_state_dict` or hook raising, Ctrl-C), every tensor already written
    is put back: that costs the old contents of the tensors being loaded, held until
    the load succeeds (a parameter read straight from a file gets fresh storage, its
    old one kept as the undo). `transactional=False` saves that memory and loads in
    place; a failure then raises `LoadError` saying the model may be partly loaded.
    """

    import torch

    from .io import Checkpoint  # the readers load on first use: `import ckptmap` stays light

    if not isinstance(model, torch.nn.Module):
        raise UsageError(f"load_into loads into an nn.Module, not {type(model).__name__}")
    policies = {
        "on_mismatch": on_mismatch,
        "on_missing": on_missing,
        "on_unexpected": on_unexpected,
        "on_unused": on_unused,
    }
    if _sharded(model):  # DTensor parameters: each rank reads its own boxes, through DCP
        return _freeze(model, _load_sharded(model, source, rules, policies, from_))
    source = opened(source)
    plan = _plan_into(model, source, rules, policies, from_)
    plan.check()
    # Everything is checked before the first tensor is written: shapes and names (the
    # plan did), the source against the plan, and that each dtype can be copied over.
    _refuse_complex_into_real(plan)
    refuse_oversized(plan)
    _refuse_meta_model(model, plan)
    tensors = checked_source(plan, source)
    refuse_unloadable(plan, source, tensors)
    if not isinstance(source, Checkpoint):  # a file's tensors are not the model's
        tensors = _apart_from(model, tensors)
    if plan.warnings:  # said before anything is written: a warning made an error stops here
        warnings.warn("ckptmap: " + "\n".join(render_problems(plan.warnings, plan)), stacklevel=2)
    stream_into(
        model,
        plan,
        tensors,
        # a state_dict carries torch's per-module `_metadata` (versions) as an attribute
        {} if isinstance(source, Checkpoint) else getattr(source, "_metadata", None) or {},
        source if isinstance(source, Checkpoint) else None,
        transactional=transactional,
    )
    return _freeze(model, plan)


def _load_sharded(model: Any, source: Any, rules: Any, policies: dict, from_: Any) -> Any:
    """load_into's checks, made on every rank by `ckptmap.dcp.load_sharded`."""
    from .dcp import load_sharded

    def checked(src: Any) -> Any:
        plan = _plan_into(model, src, rules, policies, from_).check()
        _refuse_complex_into_real(plan)
        refuse_oversized(plan)
        _refuse_meta_model(model, plan)
        if plan.warnings:  # on every rank, before anything is read
            message = "ckptmap: " + "\n".join(render_problems(plan.warnings, plan))
            warnings.warn(message, stacklevel=6)
        return plan

    return load_sharded(model, source, checked)


def _freeze(model: Any, plan: Any) -> Report:
    """The plan's freeze decisions on the loaded model, and the Report."""
    decisions = {t.target: t.frozen for t in plan.trainable}
    frozen = []
    for name, param in model.named_parameters():
        if name in decisions:
            param.requires_grad_(not decisions[name])
        if not param.requires_grad and name in decisions:
            frozen.append(name)
    return plan.report(frozen=frozen)


def _plan_into(model: Any, source: Any, rules: Any, policies: dict, from_: str | None) -> Any:
    """The plan of a load: from rules, or through a history's steps."""
    if isinstance(rules, History):
        given = [k for k, v in policies.items() if v is not None]
        if given:
            raise UsageError(
                f"{', '.join(given)}: a history's steps keep their own policies",
                hint="write the policy into the step file (on missing warn)",
            )
        return rules.plan_into(model, source, from_=from_)
    if from_ is not None:
        raise UsageError("from_ names a revision: it goes with a History")
    return compile(rules).plan(source, model, **policies)


@needs_torch("ckptmap.migrate")
def migrate(
    source: Any,
    rules: Any,
    target: Any = None,
    *,
    on_mismatch: str | None = None,
    on_missing: str | None = None,
    on_unexpected: str | None = None,
    on_unused: str | None = None,
) -> tuple[dict[str, torch.Tensor], Report]:
    """Rewrite a state_dict (or checkpoint file) under the rules: `(new_state_dict, report)`.

    `source` is a state_dict or a checkpoint path; `rules` as for `compile`; `target`
    (optional) anything a plan takes: a state_dict, `{name: shape}`, an nn.Module or a
    checkpoint path, to validate against. Raises `PlanError` when the plan has errors.

        new_sd, report = ckptmap.migrate("old.safetensors", Path("v1_to_v2.ckmap"))
    """
    source = opened(source)
    plan = compile(rules).plan(
        source,
        target,
        on_mismatch=on_mismatch,
        on_missing=on_missing,
        on_unexpected=on_unexpected,
        on_unused=on_unused,
    )
    return apply_plan(plan, source), plan.report(frozen=[])  # a state_dict has no requires_grad


def _refuse_complex_into_real(plan: Any) -> None:
    targets = {t.target: t for t in plan.targets or ()}
    for o in plan.outputs:
        dst = targets[o.target].dtype or "" if o.target in targets else ""
        if o.status == "loaded" and (o.dtype or "").startswith("complex") and "complex" not in dst:
            raise LoadError(
                f"{o.target}: cannot load a complex tensor ({o.dtype}) into {dst}", code="CKM403"
            )


def _sharded(model: Any) -> bool:
    """A model with DTensor parameters (FSDP2, tensor parallel)."""
    tensor_module = sys.modules.get("torch.distributed.tensor")  # loaded if a DTensor exists
    return tensor_module is not None and any(
        isinstance(t, tensor_module.DTensor) for t in model.state_dict(keep_vars=True).values()
    )


def _refuse_meta_model(model: Any, plan: Any) -> None:
    """A model on the meta device has no memory to load into: say so, not "loaded"."""
    state = model.state_dict(keep_vars=True)
    meta = [
        o.target
        for o in plan.outputs
        if o.status == "loaded" and state.get(o.target) is not None and _on_meta(state[o.target])
    ]
    if meta:
        raise LoadError(
            f"{meta[0]} (and {len(meta) - 1} more) is on the meta device: there is nothing to "
            "load into",
            code="CKM408",
            hint="build the model on a real device first (model.to_empty(device='cpu'))",
        )


def _on_meta(t: Any) -> bool:
    """A tensor, or this rank's piece of a DTensor, on the meta device."""
    return local_piece(t).is_meta


def _apart_from(model: Any, tensors: Any) -> Any:
    """A source that is the model's own state_dict (or shares its storage) is read before
    it is written: those tensors are copied first, or a permutation would read what it
    already overwrote."""
    from collections.abc import Mapping

    if not isinstance(tensors, Mapping):
        return tensors
    import torch

    mine = {
        t.untyped_storage().data_ptr()
        for t in model.state_dict(keep_vars=True).values()
        if isinstance(t, torch.Tensor) and not t.is_meta and t.numel()
    }
    shared = [
        k
        for k, t in tensors.items()
        if isinstance(t, torch.Tensor)
        and t.layout == torch.strided
        and not t.is_meta
        and t.numel()
        and t.untyped_storage().data_ptr() in mine
    ]
    if not shared:
        return tensors
    copy = dict(tensors)
    for key in shared:
        copy[key] = tensors[key].detach().clone()
    return copy
