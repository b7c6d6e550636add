"""Executing plans: the mapped state_dict, loading into a model, migrating a checkpoint."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import LoadError, summarize

if TYPE_CHECKING:
    import torch

    from .io import Checkpoint
    from .plan import Plan
    from .report import Report


def _opened(source: Any) -> Any:
    """A checkpoint path opened once, so planning and loading read one set of headers."""
    if isinstance(source, (str, Path)):
        from .io import open_checkpoint

        return open_checkpoint(source)
    return source


def _tensors(source: Any) -> Mapping[str, torch.Tensor]:
    """The source's tensors, by name (a checkpoint is read lazily, tensor by tensor)."""
    from .io import Checkpoint

    source = _opened(source)
    if isinstance(source, Checkpoint):
        return source.tensors()
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
    source = _opened(source)
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

    source = _opened(source)
    plan = compile(rules).plan(
        source, target, on_mismatch=on_mismatch, on_missing=on_missing, on_unexpected=on_unexpected
    )
    return apply_plan(plan, source), plan.report(frozen=[])  # a state_dict has no requires_grad


def write_plan(
    plan: Plan,
    checkpoint: Checkpoint,
    out: Path,
    *,
    metadata: dict[str, str],
    max_shard_size: int | None = None,
    on_bytes: Callable[[int], None] | None = None,
) -> list[Path]:
    """Execute a plan file to file: each tensor is read, written and released in turn.

    Tensors that were tied in the source (one tensor under several names) are
    stored once and tied again when the output is read.
    """
    from .io.write import save_checkpoint
    from .plan import TensorMeta

    plan.check()
    meta = checkpoint.meta()
    problems = [
        f"{e.source}: the checkpoint has {list(meta[e.source].shape)}, the plan {e.shape}"
        for e in plan.sources
        if e.source not in meta or list(meta[e.source].shape) != e.shape
    ]
    if problems or len(meta) != len(plan.sources):
        raise LoadError(
            "the checkpoint does not match the plan", code="CKM402", details=summarize(problems)
        )
    loaded = [e for e in plan.sources if e.status == "loaded"]
    source_of = {e.target: e.source for e in loaded}
    target_of = {e.source: e.target for e in loaded}
    ties = checkpoint.ties()
    order = {name: i for i, name in enumerate(meta)}
    aliases = {}
    for e in loaded:
        # a tied group is stored under the name the source gives first (wte, not lm_head)
        group = sorted((s for s in ties.get(e.source, ()) if s in target_of), key=order.get)
        if group and target_of[group[0]] != e.target:
            aliases[e.target] = target_of[group[0]]
    items = [(e.target, TensorMeta(tuple(e.shape), meta[e.source].dtype)) for e in loaded]
    return save_checkpoint(
        out,
        items,
        lambda name: checkpoint.get(source_of[name]),
        metadata=metadata,
        aliases=aliases,
        max_shard_size=max_shard_size,
        on_bytes=on_bytes,
    )
