"""Resolution: what the pipeline made, met with the target and the policies.

Outputs are named and checked (invalid names, two sources on one name), `init`
applies, each target key finds its provider (or is initialized, tied or missing),
freeze/unfreeze decide, unused rules are found with their near misses, and the
`Plan` is assembled and fingerprinted.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from .alloc import no_gc
from .meta import Described
from .pipeline import Builder
from .plan import (
    Fate,
    OutputEntry,
    Plan,
    Problem,
    RuleInfo,
    SourceEntry,
    TargetEntry,
    Trainable,
    Why,
    fingerprint_of,
    problem,
)
from .rules import Strip

if TYPE_CHECKING:
    from .compile import Program
    from .statements import Rule


def build_plan(
    program: Program, source: Described, target: Described | None, policies: dict[str, str]
) -> Plan:
    with no_gc():
        return _build_plan(program, source, target, policies)


def _build_plan(
    program: Program, source: Described, target: Described | None, policies: dict[str, str]
) -> Plan:
    builder = Builder(program, source)
    live = builder.run()
    problems, used = builder.problems, builder.used
    outputs = _outputs(program, builder, live)
    landing = _landing(program, outputs, problems)
    targets = None
    if target is not None:
        targets = _match_target(
            program, builder, outputs, landing, target, policies, used, problems
        )
    sources = _source_entries(builder, outputs, source)
    trainable = _trainable(program, target, landing, used)
    unused = [
        r.id
        for r in program.rules
        if r.id not in used
        and r.role not in ("policy", "revision")  # they match no key: never unused
        and not (r.node.keyword == "init" and target is not None and _any_match(r, target.meta))
    ]
    if unused and policies["unused"] != "ignore":
        problems += _unused_problems(program, unused, source, outputs, targets, policies)
    plan = Plan(
        rules_fingerprint=program.fingerprint,
        rules=[RuleInfo(id=r.id, text=r.text, span=r.span) for r in program.rules],
        policies=dict(sorted(policies.items())),
        values=builder.values,
        sources=sources,
        steps=builder.steps,
        outputs=outputs,
        targets=targets,
        problems=problems,
        unused_rules=unused,
        trainable=trainable,
    )
    plan.fingerprint = fingerprint_of(plan)
    return plan


def _outputs(program: Program, builder: Builder, live: list) -> list[OutputEntry]:
    """What the pipeline produced, each under its final name, then `init` on those names;
    a name that is no key is a problem."""
    outputs: list[OutputEntry] = []
    inits = program.inits
    for n in live:
        name = n.name
        failed = n.failed
        if not name or name[0] == "." or name[-1] == "." or ".." in name:
            failed = failed or "name"
            builder.problems.append(
                problem(
                    "CKM305",
                    "name",
                    f"{', '.join(n.sources)} became {n.name!r}, not a valid key",
                    list(n.sources),
                    n.rules,
                )
            )
        status: Fate = "loaded"
        reason: Any = None  # a failed node's kind of problem, or init
        rules = list(n.rules)
        init = _first_match(inits, name) if inits else None
        if failed is not None:
            status, reason = "failed", failed
        elif init is not None:
            builder.used.add(init.id)
            rules.append(init.id)
            status, reason = "skipped", "init"
        v = builder.values[n.value]
        outputs.append(
            OutputEntry(
                target=name,
                value=n.value,
                shape=list(v.shape),
                dtype=v.dtype,
                sources=list(n.sources),
                status=status,
                reason=reason,
                rules=rules,
            )
        )
    return outputs


def _landing(
    program: Program, outputs: list[OutputEntry], problems: list[Problem]
) -> dict[str, list[OutputEntry]]:
    """The loaded outputs by name. Two tensors on one name are never silent: a problem
    naming both and their rules, and neither is loaded."""
    landing: dict[str, list[OutputEntry]] = defaultdict(list)
    for o in outputs:
        if o.status == "loaded":
            landing[o.target].append(o)
    for name in sorted(name for name, group in landing.items() if len(group) > 1):
        group = landing[name]
        via = "; ".join(
            f"{', '.join(o.sources)} via {_rules_text(program, o.rules)}" for o in group
        )
        problems.append(
            problem(
                "CKM301",
                "conflict",
                f"{len(group)} sources map to {name!r}: {via}",
                [s for o in group for s in o.sources],
                sorted({r for o in group for r in o.rules}),
            )
        )
        for o in group:
            o.status, o.reason = "failed", "conflict"
        del landing[name]
    return landing


def _trainable(
    program: Program, target: Described | None, landing: dict, used: set[int]
) -> list[Trainable]:
    """freeze/unfreeze on the target's parameters (or, without a target, the loaded names):
    the last matching rule decides."""
    if not program.trainability:
        return []
    if target is not None:
        names = sorted(target.parameters if target.parameters is not None else target.meta)
    else:
        names = sorted(landing)
    trainable = []
    for name in names:
        decided = _last_match(program.trainability, name)
        if decided is not None:
            used.add(decided.id)
            trainable.append(
                Trainable(target=name, frozen=decided.node.keyword == "freeze", rule=decided.id)
            )
    return trainable


def _source_entries(
    builder: Builder, outputs: list[OutputEntry], source: Described
) -> list[SourceEntry]:
    """Each source's fate, from the tensors it ended in: loaded wins, then unexpected, then
    the first."""
    rank = {"failed": -1, "loaded": 0, "unexpected": 1}
    fates: dict[str, tuple[int, Fate, Why | None, str, list[int]]] = {}

    def offer(key: str, status: Fate, reason: Why | None, name: str, rules: list[int]) -> None:
        r = rank.get(status, 2)
        held = fates.get(key)
        if held is None or r < held[0]:
            fates[key] = (r, status, reason, name, rules)

    for n in builder.dropped:
        for s in n.sources:
            offer(s, "skipped", "skip", n.name, n.rules)
    for o in outputs:
        if len(o.sources) == 1 and o.status == "loaded":  # most keys: one source, loaded
            held = fates.get(key := o.sources[0])
            if held is None or held[0] > 0:
                fates[key] = (0, "loaded", None, o.target, o.rules)
        else:
            for s in o.sources:
                offer(s, o.status, o.reason, o.target, o.rules)
    entries = []
    values = builder.source_values
    for key in sorted(source.meta):
        meta = source.meta[key]
        _, status, reason, name, rules = fates[key]
        entries.append(
            SourceEntry(
                source=key,
                value=values[key],
                target=name,
                shape=list(meta.shape),
                dtype=meta.dtype,
                status=status,
                reason=reason if status in ("skipped", "failed") else None,
                rules=list(rules),
            )
        )
    return entries


def _match_target(
    program: Program,
    builder: Builder,
    outputs: list[OutputEntry],
    landing: dict[str, list[OutputEntry]],
    target: Described,
    policies: dict[str, str],
    used: set[int],
    problems: list[Problem],
) -> list[TargetEntry]:
    """Each output checked against the target (unexpected, mismatched), then each target key
    given its provider, its `init`, its tied twin, or reported missing."""
    mismatched: dict[str, OutputEntry] = {}
    for o in outputs:
        if o.status != "loaded":
            continue
        want = target.meta.get(o.target)
        if want is None:
            o.status = "unexpected"
            if policies["unexpected"] != "ignore":
                what = ", ".join(o.sources) if o.sources != [o.target] else o.target
                problems.append(
                    problem(
                        "CKM304",
                        "unexpected",
                        f"{what!r} maps to {o.target!r}, which the target does not have",
                        list(o.sources),
                        o.rules,
                        policies["unexpected"],
                    )
                )
        elif tuple(o.shape) != want.shape:
            o.status, o.reason = "skipped", "mismatch"
            mismatched[o.target] = o
            if policies["mismatch"] == "error":
                problems.append(_mismatch(program, builder, o, want.shape))
    failed = {o.target: o for o in outputs if o.status == "failed"}
    out = {
        name: _target_entry(program, builder, failed, landing, mismatched, used, name, meta)
        for name, meta in sorted(target.meta.items())
    }
    # a key that shares storage with a loaded key is loaded too (tied embeddings)
    for name, entry in out.items():
        if entry.status != "missing" or entry.reason == "failed":
            continue
        loaded_twin = next(
            (k for k in target.ties.get(name, ()) if k != name and out[k].status == "loaded"), None
        )
        if loaded_twin is not None:
            entry.status, entry.reason, entry.tied_to = "loaded", "tied", loaded_twin
        elif policies["missing"] != "ignore":
            problems.append(
                problem(
                    "CKM303",
                    "missing",
                    f"missing: nothing provides {name!r} {list(entry.shape)}",
                    [name],
                    [],
                    policies["missing"],
                )
            )
    return list(out.values())


def _mismatch(program: Program, builder: Builder, o: OutputEntry, want: tuple) -> Problem:
    """A shape mismatch said as it happened: the file's shape, the ops, what they made, what
    the target expects, and the rule that decided the shape."""
    what = ", ".join(o.sources) if o.sources != [o.target] else o.target
    history = builder.history(o.value)
    if history is None:  # no op touched it: the file's shape is the one compared
        said = f"{what} {list(o.shape)} -> {o.target} expects {list(want)}"
    else:
        said = f"{history} gives {list(o.shape)} for {o.target}, which expects {list(want)}"
    # the rule that decided the shape: the one whose op made it, else the last
    decider = builder.shaped_by(o.value)
    if decider is None and o.rules:
        decider = o.rules[-1]
    if decider is not None:
        said += f" (via {program.rules[decider].where()})"
    return problem("CKM302", "mismatch", f"shape mismatch: {said}", [*o.sources, o.target], o.rules)


def _target_entry(program, builder, failed, landing, mismatched, used, name, meta) -> TargetEntry:
    """Where one target key comes from (its tie is decided after all are known)."""
    base = {"target": name, "shape": list(meta.shape), "dtype": meta.dtype}
    providers = [o for o in landing.get(name, ()) if o.status == "loaded"]
    if providers:
        return TargetEntry(
            **base, status="loaded", sources=providers[0].sources, rules=providers[0].rules
        )
    if name in mismatched:
        o = mismatched[name]
        return TargetEntry(
            **base, status="initialized", sources=o.sources, reason="mismatch", rules=o.rules
        )
    if (init := _first_match(program.inits, name)) is not None:
        used.add(init.id)
        return TargetEntry(**base, status="initialized", reason="init", rules=[init.id])
    if name in failed:  # its provider failed: that problem is the one to read
        o = failed[name]
        return TargetEntry(
            **base, status="missing", sources=o.sources, reason="failed", rules=o.rules
        )
    if name in builder.failed_names:  # what a failed merge or split would have made
        return TargetEntry(**base, status="missing", reason="failed")
    return TargetEntry(**base, status="missing")


def _unused_problems(
    program: Program,
    unused: list[int],
    source: Described,
    outputs: list[OutputEntry],
    targets: list[TargetEntry] | None,
    policies: dict[str, str],
) -> list[Problem]:
    """Each unused rule that is not `optional`, with the keys it nearly matched: first the
    unexpected and missing ones (where a typo's key would be), then any source key."""
    troubled = [o.target for o in outputs if o.status == "unexpected"]
    troubled += [t.target for t in targets or () if t.status == "missing"]
    pools = [troubled, list(source.meta), [o.target for o in outputs]]
    found = []
    for i in unused:
        rule = program.rules[i]
        if rule.node.optional:
            continue
        said = f"unused rule: {rule.where()} matches no key"
        consumed = next((k for k in sorted(source.meta) if rule.matches_source(k)), None)
        if consumed is not None:  # not a typo: the keys were there, and earlier rules took them
            said += (
                f"; the source has keys it would match (such as {consumed}), but earlier rules "
                "renamed or dropped them first"
            )
        elif near := next((n for pool in pools if (n := _near_misses(rule, pool))), []):
            said += "; did you mean " + " or ".join(near) + "?"
        found.append(problem("CKM310", "unused", said, [], [i], policies["unused"]))
    return found


def _near_misses(rule: Rule, keys: list[str]) -> list[str]:
    """Leading parts of `keys` that read almost like the rule's pattern (numbers, `*` and
    `{captures}` compared as one placeholder), each with an example key."""
    import difflib
    import re

    node = rule.node
    text = getattr(node, "prefix", None)
    if text is None:
        pattern = (getattr(node, "patterns", None) or (getattr(node, "pattern", None),))[0]
        if pattern is None or pattern.regex:
            return []
        text = pattern.text
    placeholder = re.compile(r"\{[^}]*\}|\*+|\d+")
    dot = "." if isinstance(node, Strip) and text.endswith(".") else ""  # `strip "module."`
    width = text.removesuffix(dot).count(".") + 1
    heads: dict[str, tuple[str, str]] = {}
    for key in sorted(set(keys)):  # sorted: the same plan whatever order the keys came in
        head = ".".join(key.split(".")[:width]) + dot
        heads.setdefault(placeholder.sub("#", head), (head, key))
    wanted = placeholder.sub("#", text)
    heads.pop(wanted, None)  # the pattern itself is no suggestion
    close = difflib.get_close_matches(wanted, list(heads), n=3, cutoff=0.75)
    out = []
    for c in close:
        head, key = heads[c]
        out.append(f"{head!r} (as in {key})" if head != key else repr(key))
    return out


def _first_match(rules: tuple[Rule, ...], name: str) -> Rule | None:
    return next((r for r in rules if r.matches(name)), None)


def _last_match(rules: tuple[Rule, ...], name: str) -> Rule | None:
    return next((r for r in reversed(rules) if r.matches(name)), None)


def _any_match(rule: Rule, names: Mapping[str, Any]) -> bool:
    return any(rule.matches(n) for n in names)


def _rules_text(program: Program, ids: list[int]) -> str:
    if not ids:
        return "no rule (name unchanged)"
    return ", ".join(program.rules[i].where() for i in ids)
