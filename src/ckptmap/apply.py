"""Executing plans: the mapped state_dict, loading into a model, migrating a checkpoint."""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import LoadError, summarize

if TYPE_CHECKING:
    import torch

    from .plan import Plan
    from .report import Report


def _tensors(source: Any) -> Mapping[str, torch.Tensor]:
    """The source's tensors, by name (a checkpoint file is opened lazily)."""
    if isinstance(source, (str, Path)):
        from .io import open_checkpoint

        return open_checkpoint(source).tensors()
    if isinstance(source, Mapping):
        return source
    raise TypeError(
        f"source must be a state_dict or a checkpoint path, not {type(source).__name__}"
    )


def apply_plan(plan: Plan, source: Any) -> dict[str, torch.Tensor]:
    """The mapped state_dict. Renames hand back the source's own tensor objects (no copy)."""
    import torch

    plan.check()
    tensors = _tensors(source)
    expected = {e.source: e for e in plan.sources}
    problems = [
        f"{k}: in the source, not in the plan" for k in sorted(set(tensors) - set(expected))
    ]
    problems += [
        f"{k}: in the plan, not in the source" for k in sorted(set(expected) - set(tensors))
    ]
    out: dict[str, torch.Tensor] = {}
    for entry in plan.sources:
        if entry.source not in tensors:
            continue
        tensor = tensors[entry.source]
        if not isinstance(tensor, torch.Tensor):
            problems.append(f"{entry.source}: a {type(tensor).__name__}, not a tensor")
            continue
        if list(tensor.shape) != entry.shape:
            problems.append(
                f"{entry.source}: shape {list(tensor.shape)}, the plan was made for {entry.shape}"
            )
            continue
        if entry.status == "loaded":
            out[entry.target] = tensor
    if problems:
        raise LoadError(
            "the source does not match the plan it is applied with",
            code="CKM402",
            details=summarize(problems),
            hint="make the plan from this source: program.plan(source, target)",
        )
    return out


def load_into(
    model: torch.nn.Module,
    source: Any,
    rules: Any,
    *,
    on_mismatch: str | None = None,
    on_missing: str | None = None,
    on_unexpected: str | None = None,
) -> Report:
    """Plan, validate, load and freeze, all or nothing; return the Report.

    `source` is a state_dict or a checkpoint path; `rules` a Ruleset, Program,
    rule text or rule file Path. When validation fails, `PlanError` is raised
    and the model's tensors and `requires_grad` flags are exactly as before.
    """
    import torch

    from .compile import compile

    program = compile(rules)
    plan = program.plan(
        source, model, on_mismatch=on_mismatch, on_missing=on_missing, on_unexpected=on_unexpected
    )
    plan.check()
    mapped = apply_plan(plan, source)

    # Everything is checked before the first tensor is written: shapes (the plan did)
    # and that every value can be copied into its destination's dtype.
    state = model.state_dict(keep_vars=True)
    for name, tensor in mapped.items():
        dst = state[name]
        if tensor.is_complex() and not dst.is_complex():
            raise LoadError(
                f"{name}: cannot load a complex tensor ({tensor.dtype}) into {dst.dtype}",
                code="CKM403",
            )
    with torch.no_grad():
        result = model.load_state_dict(mapped, strict=False)
    if result.unexpected_keys:  # the plan promised otherwise: a module rewrote its keys
        raise LoadError(
            "the model refused keys the plan sent it",
            code="CKM404",
            details=summarize(result.unexpected_keys),
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
) -> tuple[dict[str, torch.Tensor], Report]:
    """Rewrite a state_dict (or checkpoint file) under the rules: `(new_state_dict, report)`."""
    from .compile import compile

    plan = compile(rules).plan(
        source, target, on_mismatch=on_mismatch, on_missing=on_missing, on_unexpected=on_unexpected
    )
    return apply_plan(plan, source), plan.report()
