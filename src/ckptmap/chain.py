"""Plans composed: the steps of a revision history, each planned in its own scope, made one
Plan (one pass over the bytes, no intermediate files).

Step i+1 is planned on what step i leaves: the tensors it loads under the child's names,
and those the child introduces (`init`). Composing renumbers step i+1's values after step
i's and wires its sources to step i's outputs, so a rename chain stays a rename (the bytes
of a safetensors source are still copied undecoded) and ops run once, in order. What a
step introduces is made by its `init ... | fill` (a step of the plan with no inputs), or
left to the model (the target key is initialized, as `init` leaves it).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field

from .errors import HistoryError, summarize
from .meta import CODES, TensorMeta
from .ops import OpArgError, OpError, make
from .plan import (
    OutputEntry,
    Plan,
    RuleInfo,
    SourceEntry,
    Step,
    TargetEntry,
    Trainable,
    Value,
    fingerprint_of,
)
from .rules import OpCall


@dataclass
class Hop:
    """One step's plan and what it fills: {target key: the fill of the init that names it}."""

    plan: Plan
    fills: dict[str, OpCall] = field(default_factory=dict)


_UNFILLED = -1  # the value of a tensor introduced with no fill, and of all made of it


@dataclass
class _Tensor:
    """A tensor between two steps: its value in the composed plan, what it is made of."""

    value: int | None  # None: introduced with no fill (the model provides it)
    sources: list[str]
    rules: list[int]


def introduced(plan: Plan) -> dict[str, TargetEntry]:
    """The target keys a step's plan leaves to `init`: what that revision introduces."""
    return {
        t.target: t
        for t in plan.targets or ()
        if t.status == "initialized" and t.reason == "init" and not t.sources
    }


def next_source(plan: Plan) -> dict[str, TensorMeta]:
    """What a step leaves for the next one, as a source: loaded and introduced tensors."""
    out = {o.target: TensorMeta(tuple(o.shape), o.dtype) for o in plan.outputs if _loaded(o)}
    for name, t in introduced(plan).items():
        out[name] = TensorMeta(tuple(t.shape), t.dtype)
    return out


def _loaded(o: OutputEntry) -> bool:
    return o.status == "loaded"


def compose(hops: Sequence[Hop]) -> Plan:
    """The steps as one plan from the first step's sources to the last step's targets."""
    if not hops:
        raise ValueError("compose needs at least one step")
    first = hops[0].plan
    rules: list[RuleInfo] = []
    values: list[Value] = list(first.values)
    steps: list[Step] = []
    current: dict[str, _Tensor] = {
        e.source: _Tensor(e.value, [e.source], []) for e in first.sources
    }
    fates: dict[str, SourceEntry] = {}  # first-step sources dropped on the way, and why
    problems, unused = [], []
    decided: dict[int, tuple[bool, int]] = {}  # value -> (frozen, rule): the last step's wins
    for i, hop in enumerate(hops):
        plan = hop.plan
        roff = len(rules)
        rules += [RuleInfo(id=r.id + roff, text=r.text, span=r.span) for r in plan.rules]
        problems += [
            p.model_copy(update={"rules": [r + roff for r in p.rules]}) for p in plan.problems
        ]
        unused += [r + roff for r in plan.unused_rules]
        remap = _wire(plan, current, values, i == 0)
        for s in plan.steps:
            if any(remap[v] == _UNFILLED for v in s.inputs):  # the model's to provide
                remap.update((v, _UNFILLED) for v in s.outputs)
                continue
            steps.append(
                Step(
                    op=s.op,
                    args=list(s.args),
                    inputs=[remap[v] for v in s.inputs],
                    outputs=[remap[v] for v in s.outputs],
                    rule=s.rule + roff,
                )
            )
        for e in plan.sources:  # dropped here: every first-step source it was made of
            if e.status != "loaded":
                for key in current[e.source].sources:
                    fates.setdefault(key, _dropped(e, key, current[e.source].rules, roff))
        current = _after(plan, current, remap, roff)
        current |= _introduce(hop, values, steps, roff)
        for t in plan.trainable:  # a step's freeze speaks of its names: follow the tensor
            here = current.get(t.target)
            if here is not None and here.value is not None:
                decided[here.value] = (t.frozen, t.rule + roff)
    last = hops[-1].plan
    roff = len(rules) - len(last.rules)
    outputs, targets = _final(last, current, {s.rule for s in steps if not s.inputs})
    made_into: dict[str, list[OutputEntry]] = {}
    for o in outputs:  # what the bytes are: the value's dtype (a bf16 copy stays bf16)
        o.dtype = values[o.value].dtype or o.dtype
        for key in o.sources:
            made_into.setdefault(key, []).append(o)
    plan = Plan(
        rules_fingerprint=_chain_fingerprint([h.plan.rules_fingerprint for h in hops]),
        rules=rules,
        policies=last.policies,
        values=values,
        sources=[_fate(e, fates, made_into) for e in first.sources],
        steps=steps,
        outputs=outputs,
        targets=targets,
        problems=problems,
        unused_rules=unused,
        trainable=_trainable(outputs, decided, last, roff),
    )
    plan.fingerprint = fingerprint_of(plan)
    return plan


def _trainable(
    outputs: list[OutputEntry], decided: dict[int, tuple[bool, int]], last: Plan, roff: int
) -> list[Trainable]:
    """freeze/unfreeze over the chain: each step's decisions follow its tensors to their
    final names; the last step also speaks of keys it introduces. The latest step wins."""
    final = {o.target: decided[o.value] for o in outputs if o.value in decided}
    final |= {t.target: (t.frozen, t.rule + roff) for t in last.trainable}
    return [Trainable(target=k, frozen=f, rule=r) for k, (f, r) in sorted(final.items())]


def _introduce(hop: Hop, values: list[Value], steps: list[Step], roff: int) -> dict[str, _Tensor]:
    """What the step introduces: made by its fill (a step with no inputs, the shape and
    dtype from the schema appended to the fill's arguments), or left to the model."""
    out: dict[str, _Tensor] = {}
    for name, t in introduced(hop.plan).items():
        fill = hop.fills.get(name)
        rule_ids = [r + roff for r in t.rules]
        if fill is None:
            out[name] = _Tensor(None, [], rule_ids)
            continue
        v = len(values)
        dtype = t.dtype or "float32"
        args = list(fill.args)
        if fill.name == "normal":  # one seed in the rule, a generator per tensor: never alike
            args[2] = tensor_seed(args[2], name)
        try:  # what a schema says must be something the fill can make
            make(fill.name, [*args, list(t.shape), dtype]).infer([])
            if dtype not in CODES:
                raise OpError(f"{dtype} is no dtype a file can hold")
        except (OpError, OpArgError) as e:
            raise HistoryError(f"{name}: cannot fill it: {e}", code="CKM606") from None
        values.append(Value(shape=list(t.shape), dtype=dtype))
        steps.append(
            Step(
                op=fill.name,
                args=[*args, list(t.shape), dtype],
                inputs=[],
                outputs=[v],
                rule=rule_ids[0],
            )
        )
        out[name] = _Tensor(v, [], rule_ids)
    return out


def tensor_seed(seed: int, key: str) -> int:
    """The seed of one tensor's generator: the rule's seed and the key's name, hashed (so
    the q, k and v an init fills differ, and every upgrade writes the same bytes)."""
    digest = hashlib.sha256(f"{seed}:{key}".encode()).digest()
    return int.from_bytes(digest[:7], "little")


def _wire(
    plan: Plan, current: dict[str, _Tensor], values: list[Value], first: bool
) -> dict[int, int]:
    """This step's value numbers in the composed plan: its sources are the tensors the
    steps before it left; everything else it makes is numbered after what exists."""
    if first:
        return {v: v for v in range(len(plan.values))}
    remap: dict[int, int] = {}
    for e in plan.sources:
        here = current.get(e.source)
        if here is None or here.value is None:
            if e.status == "loaded" and here is None:
                raise HistoryError(
                    f"{e.source}: the step is planned on a tensor nothing before it made",
                    code="CKM603",
                )
            remap[e.value] = _UNFILLED
            continue
        remap[e.value] = here.value
    for v, value in enumerate(plan.values):
        if v not in remap:
            remap[v] = len(values)
            values.append(Value(shape=list(value.shape), dtype=value.dtype))
    return remap


def _after(
    plan: Plan, current: dict[str, _Tensor], remap: dict[int, int], roff: int
) -> dict[str, _Tensor]:
    """The tensors this step leaves, under its target names, with what made them."""
    out: dict[str, _Tensor] = {}
    for o in plan.outputs:
        if not _loaded(o):
            continue
        made_of = [current[s] for s in o.sources]
        value: int | None = remap[o.value]
        if value == _UNFILLED or any(m.value is None for m in made_of):
            _refuse_mixed(o, made_of)
            value = None
        out[o.target] = _Tensor(
            value,
            [s for m in made_of for s in m.sources],
            [r for m in made_of for r in m.rules] + [r + roff for r in o.rules],
        )
    return out


def _refuse_mixed(o: OutputEntry, made_of: list[_Tensor]) -> None:
    """A tensor made only of introduced, unfilled ones stays the model's to provide; one
    that mixes them with loaded tensors cannot be made at all."""
    if all(m.value is None for m in made_of):
        return None
    raise HistoryError(
        f"{o.target} is made of tensors an earlier revision introduces with no fill "
        f"and of loaded ones ({', '.join(o.sources)})",
        code="CKM606",
        hint='give the init that introduces them a fill: init "..." | zeros()',
    )


def _final(
    last: Plan, current: dict[str, _Tensor], fill_rules: set[int]
) -> tuple[list[OutputEntry], list[TargetEntry] | None]:
    """The composed plan's outputs and targets: the last step's, each output made of the
    first step's sources; a target made of introduced, unfilled tensors is initialized
    (the model's own values), one with a fill is made by its fill step."""
    outputs: list[OutputEntry] = []
    targets = {t.target: t for t in last.targets or ()}
    for name, t in current.items():
        if t.value is None:
            if name in targets:
                targets[name] = TargetEntry(
                    target=name,
                    shape=targets[name].shape,
                    dtype=targets[name].dtype,
                    status="initialized",
                    reason="init",
                    rules=t.rules,
                )
            continue
        entry = targets.get(name)
        outputs.append(
            OutputEntry(
                target=name,
                value=t.value,
                shape=list(entry.shape) if entry else [],
                dtype=entry.dtype if entry else None,
                sources=sorted(dict.fromkeys(t.sources)),
                status="loaded",
                rules=list(dict.fromkeys(t.rules)),
            )
        )
        if entry is not None:
            filled = not t.sources
            rules = list(dict.fromkeys(t.rules))
            if filled:  # the init that filled it decides, and is named last (as reports do)
                inits = [r for r in rules if r in fill_rules]
                rules = [r for r in rules if r not in fill_rules] + inits
            targets[name] = TargetEntry(
                target=name,
                shape=entry.shape,
                dtype=entry.dtype,
                status="initialized" if filled else "loaded",
                reason="fill" if filled else entry.reason,
                sources=sorted(dict.fromkeys(t.sources)),
                tied_to=entry.tied_to,
                rules=rules,
            )
    for o in outputs:
        if not o.shape:  # no target: the shape the last step gave it
            own = next(x for x in last.outputs if x.target == o.target)
            o.shape, o.dtype = list(own.shape), own.dtype
    outputs.sort(key=lambda o: o.target)
    return outputs, (sorted(targets.values(), key=lambda t: t.target) if last.targets else None)


def _dropped(e: SourceEntry, source: str, before: list[int], roff: int) -> SourceEntry:
    return SourceEntry(
        source=source,
        value=-1,
        target=e.target,
        shape=[],
        status=e.status,
        reason=e.reason,
        rules=[*before, *(r + roff for r in e.rules)],
    )


def _fate(
    e: SourceEntry, fates: dict[str, SourceEntry], made_into: dict[str, list[OutputEntry]]
) -> SourceEntry:
    """A first-step source's fate over the whole chain."""
    into = made_into.get(e.source)
    if into:
        return SourceEntry(
            source=e.source,
            value=e.value,
            target=into[0].target,
            shape=e.shape,
            dtype=e.dtype,
            status="loaded",
            rules=into[0].rules,
        )
    # dropped by a step (its fate says why), or nothing made of it reached the end
    why = fates.get(e.source) or SourceEntry(
        source=e.source,
        value=e.value,
        target=e.target,
        shape=[],
        status="skipped",
        reason="skip",
        rules=e.rules,
    )
    return SourceEntry(
        source=e.source,
        value=e.value,
        target=why.target,
        shape=e.shape,
        dtype=e.dtype,
        status=why.status,
        reason=why.reason,
        rules=why.rules,
    )


def _chain_fingerprint(parts: list[str]) -> str:
    if len(parts) == 1:
        return parts[0]
    return "sha256:" + hashlib.sha256("\n".join(parts).encode()).hexdigest()


def refuse_problems(plan: Plan, what: str) -> None:
    """A step's plan must be clean: every problem, named."""
    if plan.errors:
        raise HistoryError(
            f"{what}: the plan has {len(plan.errors)} problem{'s' * (len(plan.errors) != 1)}",
            code="CKM603",
            details=summarize([p.message for p in plan.errors]),
        )
