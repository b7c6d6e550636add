"""The front doors: rules, a source and a model (or a target) in; validated, loaded or
rewritten, with the Report out. Compile (compile.py), plan (resolve.py), execute
(apply.py)."""

from __future__ import annotations

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
from .errors import LoadError, UsageError

if TYPE_CHECKING:
    import torch

    from .report import Report


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
) -> Report:
    """Plan, validate, load and freeze, all or nothing; return the Report.

    `source` is a state_dict or a checkpoint path; `rules` a Ruleset, Program,
    rule text or rule file Path. When validation fails, `PlanError` is raised
    and the model's tensors and `requires_grad` flags are exactly as before.

    When anything fails during the load itself (a file cut short, a module's own
    `_load_from_state_dict` or hook raising, Ctrl-C), every tensor already written
    is put back: that costs the old contents of the tensors being loaded, held until
    the load succeeds (a parameter read straight from a file gets fresh storage, its
    old one kept as the undo). `transactional=False` saves that memory and loads in
    place; a failure then raises `LoadError` saying the model may be partly loaded.
    """

    import torch

    from .compile import compile
    from .io import Checkpoint

    if not isinstance(model, torch.nn.Module):
        raise UsageError(f"load_into loads into an nn.Module, not {type(model).__name__}")
    program = compile(rules)
    source = opened(source)
    plan = program.plan(
        source,
        model,
        on_mismatch=on_mismatch,
        on_missing=on_missing,
        on_unexpected=on_unexpected,
        on_unused=on_unused,
    )
    plan.check()
    # Everything is checked before the first tensor is written: shapes and names (the
    # plan did), the source against the plan, and that each dtype can be copied over.
    targets = {t.target: t for t in plan.targets or ()}
    for o in plan.outputs:
        dst = targets[o.target].dtype or "" if o.target in targets else ""
        if o.status == "loaded" and (o.dtype or "").startswith("complex") and "complex" not in dst:
            raise LoadError(
                f"{o.target}: cannot load a complex tensor ({o.dtype}) into {dst}", code="CKM403"
            )
    refuse_oversized(plan)
    tensors = checked_source(plan, source)
    refuse_unloadable(plan, source, tensors)
    stream_into(
        model,
        plan,
        tensors,
        # a state_dict carries torch's per-module `_metadata` (versions) as an attribute
        {} if isinstance(source, Checkpoint) else getattr(source, "_metadata", None) or {},
        source if isinstance(source, Checkpoint) else None,
        transactional=transactional,
    )

    decisions = {t.target: t.frozen for t in plan.trainable}
    frozen = []
    for name, param in model.named_parameters():
        if name in decisions:
            param.requires_grad_(not decisions[name])
        if not param.requires_grad and name in decisions:
            frozen.append(name)
    report = plan.report(frozen=frozen)
    if report.warnings:
        warnings.warn("ckptmap: " + "\n".join(report.warnings), stacklevel=2)
    return report


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
    from .compile import compile

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
