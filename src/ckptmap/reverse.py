"""Reversal on the concrete plan: outputs back to sources, step by step, never via patterns.

Every step `outputs = op(inputs)` becomes `inputs = inverse(outputs)`, with the
inverse computed for the shapes that step saw (a `cat` of [8, 4] and [4, 4]
becomes `split([8, 4], 0)`). Names come from the plan's entries, so the way
back is exactly as precise as the way there.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .errors import PlanError, summarize
from .ops import Meta, make
from .plan import OutputEntry, Plan, SourceEntry, Step, fingerprint_of, jsonable, problem

if TYPE_CHECKING:
    from .plan import Plan, Problem


def invert(plan: Plan, allow_lossy: bool = False) -> Plan:
    plan.check()
    steps, available, lossy = _inverse_steps(plan, allow_lossy)
    lossy += _lost_sources(plan, available, lossy, allow_lossy)
    lossy = list({p.message: p for p in lossy}.values())  # pieces of one tensor: said once
    if lossy and not allow_lossy:
        raise PlanError(
            f"the plan cannot be reversed exactly: {len(lossy)} entr{'ies' if len(lossy) > 1 else 'y'}",
            code="CKM308",
            problems=lossy,
            details=summarize([p.message for p in lossy]),
            hint="Plan.inverse(allow_lossy=True) / --allow-lossy restores what it can",
        )
    return _inverse_plan(plan, steps, available, lossy)


def _inverse_steps(plan: Plan, allow_lossy: bool) -> tuple[list, set[int], list]:
    """Each step replaced by its inverse for the shapes it saw, last first; what cannot be
    inverted exactly is a lossy problem (and, with `allow_lossy`, its approximation)."""
    available = {o.value for o in plan.outputs if o.status == "loaded"}
    steps: list[Step] = []
    lossy: list[Problem] = []

    def meta(v: int) -> Meta:
        return Meta(tuple(plan.values[v].shape), plan.values[v].dtype)

    def names(values: list[int]) -> str:
        out = [o.target for o in plan.outputs if o.value in values]
        out += [e.source for e in plan.sources if e.value in values]
        return ", ".join(out) or "intermediate values"

    consumers: dict[int, list[Step]] = {}
    for s in plan.steps:
        for v in s.inputs:
            consumers.setdefault(v, []).append(s)
    final = {o.value: o.target for o in plan.outputs if o.status == "loaded"}

    def made_into(step: Step) -> str:
        found, stack, seen = [], list(step.outputs), set()
        while stack:
            v = stack.pop()
            if v in seen:
                continue
            seen.add(v)
            if v in final:
                found.append(final[v])
            stack += [w for s in consumers.get(v, ()) for w in s.outputs]
        return ", ".join(sorted(found)) or "an intermediate value"

    for step in reversed(plan.steps):
        if not all(v in available for v in step.outputs):
            continue  # part of what this step made was dropped: its inputs cannot come back
        op = make(step.op, step.args)
        ins, outs = [meta(v) for v in step.inputs], [meta(v) for v in step.outputs]
        back = op.inverse(ins, outs)
        if back is None:
            why = op.lossy_for(ins, outs) or f"{op.name} has no inverse"
            rule = plan.rules[step.rule]
            # a fill (no inputs) made a tensor a revision introduced: say what it became
            what = f"{op!r} on {names(step.inputs)}" if step.inputs else made_into(step)
            lossy.append(
                problem(
                    "CKM308",
                    "lossy",
                    f"{what}: {why} ({rule})",
                    [e.source for e in plan.sources if e.value in step.inputs]
                    or [names(step.outputs)],
                    [step.rule],
                    "warn" if allow_lossy else "error",
                )
            )
            if not allow_lossy:
                continue
            back = op.approx_inverse(ins, outs)
            if back is None:
                continue
        steps.append(
            Step(
                op=back.name,
                args=[jsonable(a) for a in back.args],
                inputs=list(step.outputs),
                outputs=list(step.inputs),
                rule=step.rule,
            )
        )
        available.update(step.inputs)
    return steps, available, lossy


def _lost_sources(plan: Plan, available: set[int], lossy: list, allow_lossy: bool) -> list:
    """The sources nothing brings back (skipped, replaced by init, not in the target...),
    except those a lossy step already names."""
    found = []
    lost = [e for e in plan.sources if e.value not in available]
    behind_lossy = {s for p in lossy for s in p.keys}
    for e in lost:
        if e.source in behind_lossy:
            continue  # already named with the step that loses it
        why = {
            "skip": "it was skipped",
            "init": "it was replaced by init",
            "mismatch": "its shape did not match the target",
        }.get(e.reason or "", "not everything made from it is in the output")
        if e.status == "unexpected":
            why = "its name is not in the target"
        found.append(
            problem(
                "CKM308",
                "lossy",
                f"{e.source} cannot be restored: {why}",
                [e.source],
                e.rules,
                "warn" if allow_lossy else "error",
            )
        )
    return found


def _inverse_plan(plan: Plan, steps: list, available: set[int], lossy: list) -> Plan:
    """The inverted plan: the outputs become the sources, the sources that came back the
    outputs."""
    loaded = [o for o in plan.outputs if o.status == "loaded"]
    restored = [e for e in plan.sources if e.value in available]
    feeds = {o.value: o.target for o in loaded}
    inverse = Plan(
        rules_fingerprint=plan.rules_fingerprint,
        rules=plan.rules,
        policies=plan.policies,
        values=plan.values,
        sources=[
            SourceEntry(
                source=o.target,
                value=o.value,
                target=", ".join(o.sources),
                shape=o.shape,
                dtype=o.dtype,
                status="loaded",
                rules=o.rules,
            )
            for o in loaded
        ],
        steps=steps,
        outputs=[
            OutputEntry(
                target=e.source,
                value=e.value,
                shape=e.shape,
                dtype=e.dtype,
                sources=[feeds[e.value]]
                if e.value in feeds
                else sorted(o.target for o in loaded if e.source in o.sources),
                status="loaded",
                rules=e.rules,
            )
            for e in restored
        ],
        problems=lossy,
    )
    inverse.fingerprint = fingerprint_of(inverse)
    return inverse
