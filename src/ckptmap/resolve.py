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
from .pipeline import Builder, Live, _Group
from .plan import (
    Columns,
    Fate,
    OutputEntry,
    Plan,
    Problem,
    RuleInfo,
    SourceEntry,
    TargetEntry,
    Trainable,
    Value,
    Why,
    problem,
)
from .rules import Strip

if TYPE_CHECKING:
    from .compile import Program
    from .statements import Rule


def build_plan(
    program: Program,
    source: Described,
    target: Described | None,
    policies: dict[str, str],
    columns: bool = True,
) -> Plan:
    """The plan; `columns=False` runs every rule key by key (what the columns must equal)."""
    with no_gc():
        return _build_plan(program, source, target, policies, columns)


def _build_plan(
    program: Program,
    source: Described,
    target: Described | None,
    policies: dict[str, str],
    columns: bool,
) -> Plan:
    builder = Builder(program, source, columns)
    live = builder.run()
    problems, used = builder.problems, builder.used
    outputs = _outputs(program, builder, live)
    landing = _landing(program, outputs, problems)
    targets = None
    if target is not None:
        targets = _match_target(
            program, builder, outputs, landing, target, policies, used, problems
        )
    sources = _source_entries(builder, outputs, live)
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
    shapes, dtypes = builder.shapes, builder.dtypes
    plan = Plan(
        rules_fingerprint=program.fingerprint,
        rules=[RuleInfo(id=r.id, text=r.text, span=r.span) for r in program.rules],
        policies=dict(sorted(policies.items())),
        values=Columns(Value, [shapes, dtypes]),
        sources=sources,
        steps=builder.steps,
        outputs=Columns(
            OutputEntry,
            [
                outputs.target,
                outputs.value,
                list(map(shapes.__getitem__, outputs.value)),
                list(map(dtypes.__getitem__, outputs.value)),
                outputs.sources,
                outputs.status,
                outputs.reason,
                outputs.rules,
            ],
        ),
        targets=targets,
        problems=problems,
        unused_rules=unused,
        trainable=trainable,
    )
    return plan._seal()  # its fingerprint: of the plan as made, computed when asked


class _Outputs:
    """The tensors the plan produces, one list per field, in output order (what becomes the
    plan's `outputs`); statuses change as the target and the policies are met."""

    __slots__ = ("builder", "reason", "rules", "sources", "status", "target", "value")

    def __init__(self, builder: Builder, live: Live):
        self.builder = builder
        self.target = live.names
        self.value = live.values
        self.sources = live.sources
        self.rules = live.rules
        n = len(live.names)
        self.status: list[Fate] = ["loaded"] * n
        self.reason: list[Any] = [None] * n  # a failed node's kind of problem, or init

    def __len__(self) -> int:
        return len(self.target)

    def entry(self, i: int) -> OutputEntry:
        """Output `i` as a record (for messages: a copy, not the plan's)."""
        return OutputEntry(
            target=self.target[i],
            value=self.value[i],
            shape=list(self.builder.shapes[self.value[i]]),
            dtype=self.builder.dtypes[self.value[i]],
            sources=list(self.sources[i]),
            status=self.status[i],
            reason=self.reason[i],
            rules=list(self.rules[i]),
        )


def _bad_name(name: str) -> bool:
    return not name or name[0] == "." or name[-1] == "." or ".." in name


def _outputs(program: Program, builder: Builder, live: Live) -> _Outputs:
    """What the pipeline produced, each under its final name, then `init` on those names;
    a name that is no key is a problem. A template has a key's dots, so it says which
    names are bad."""
    outputs = _Outputs(builder, live)
    status, reason, rules = outputs.status, outputs.reason, outputs.rules
    bad = {t for t in set(live.templates) if _bad_name(t)}
    failed = live.failed
    inits = program.inits
    if not bad and not inits and not any(failed):
        return outputs
    for i, name in enumerate(live.names):
        if live.templates[i] in bad:
            failed[i] = failed[i] or "name"
            builder.problems.append(
                problem(
                    "CKM305",
                    "name",
                    f"{', '.join(live.sources[i])} became {name!r}, not a valid key",
                    list(live.sources[i]),
                    rules[i],
                )
            )
        init = _first_match(inits, name) if inits else None
        if failed[i] is not None:
            status[i], reason[i] = "failed", failed[i]
        elif init is not None:
            builder.used.add(init.id)
            rules[i] = [*rules[i], init.id]
            status[i], reason[i] = "skipped", "init"
    return outputs


def _landing(program: Program, outputs: _Outputs, problems: list[Problem]) -> dict[str, int]:
    """The loaded outputs by name. Two tensors on one name are never silent: a problem
    naming both and their rules, and neither is loaded."""
    names, status = outputs.target, outputs.status
    if status.count("loaded") == len(status):  # the usual plan: every output loaded
        loaded: list[int] = list(range(len(names)))
        landing = dict(zip(names, loaded, strict=True))
    else:
        loaded = [i for i, st in enumerate(status) if st == "loaded"]
        landing = dict(zip([names[i] for i in loaded], loaded, strict=True))
    if len(landing) == len(loaded):
        return landing
    on: dict[str, list[int]] = defaultdict(list)
    for i in loaded:
        on[names[i]].append(i)
    for name in sorted(name for name, group in on.items() if len(group) > 1):
        group = on[name]
        via = "; ".join(
            f"{', '.join(outputs.sources[i])} via {_rules_text(program, outputs.rules[i])}"
            for i in group
        )
        problems.append(
            problem(
                "CKM301",
                "conflict",
                f"{len(group)} sources map to {name!r}: {via}",
                [s for i in group for s in outputs.sources[i]],
                sorted({r for i in group for r in outputs.rules[i]}),
            )
        )
        for i in group:
            outputs.status[i], outputs.reason[i] = "failed", "conflict"
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


def _source_entries(builder: Builder, outputs: _Outputs, live: Live) -> Columns:
    """Each source's fate, from the tensors it ended in: loaded wins, then unexpected, then
    the first."""
    keys = builder.keys
    n = len(keys)
    shapes, dtypes = builder.shapes[:n], builder.dtypes[:n]
    if (
        not builder.dropped
        and len(outputs) == n
        and set(map(len, live.orders)) <= {1}
        and set(map(len, outputs.sources)) <= {1}
    ):  # every source ended in one output of its own, in the sources' order
        reasons = (
            [None] * n
            if outputs.status.count("loaded") == n
            else [
                r if st in ("skipped", "failed") else None
                for st, r in zip(outputs.status, outputs.reason, strict=True)
            ]
        )
        return Columns(
            SourceEntry,
            [
                keys,
                builder.source_ids,
                outputs.target,
                shapes,
                dtypes,
                outputs.status,
                reasons,
                outputs.rules,
            ],
        )
    rank = {"failed": -1, "loaded": 0, "unexpected": 1}
    fates: dict[str, tuple[int, Fate, Why | None, str, list[int]]] = {}

    def offer(key: str, status: Fate, reason: Why | None, name: str, rules: list[int]) -> None:
        r = rank.get(status, 2)
        held = fates.get(key)
        if held is None or r < held[0]:
            fates[key] = (r, status, reason, name, rules)

    for item in builder.dropped:
        if type(item) is _Group:
            for name, sources in zip(item.names, item.sources, strict=True):
                for s in sources:
                    offer(s, "skipped", "skip", name, item.rules)
        else:
            node: Any = item
            for s in node.sources:
                offer(s, "skipped", "skip", node.name, node.rules)
    for i, sources in enumerate(outputs.sources):
        status = outputs.status[i]
        if len(sources) == 1 and status == "loaded":  # most keys: one source, loaded
            held = fates.get(key := sources[0])
            if held is None or held[0] > 0:
                fates[key] = (0, "loaded", None, outputs.target[i], outputs.rules[i])
        else:
            for s in sources:
                offer(s, status, outputs.reason[i], outputs.target[i], outputs.rules[i])
    rows = list(map(fates.__getitem__, keys))
    return Columns(
        SourceEntry,
        [
            keys,
            builder.source_ids,
            [r[3] for r in rows],
            shapes,
            dtypes,
            [r[1] for r in rows],
            [r[2] if r[1] in ("skipped", "failed") else None for r in rows],
            [r[4] for r in rows],
        ],
    )


def _match_target(
    program: Program,
    builder: Builder,
    outputs: _Outputs,
    landing: dict[str, int],
    target: Described,
    policies: dict[str, str],
    used: set[int],
    problems: list[Problem],
) -> list[TargetEntry]:
    """Each output checked against the target (unexpected, mismatched), then each target key
    given its provider, its `init`, its tied twin, or reported missing."""
    mismatched: dict[str, int] = {}
    status, shapes, want_of = outputs.status, builder.shapes, target.meta.get
    for i, name in enumerate(outputs.target):
        if status[i] != "loaded":
            continue
        want = want_of(name)
        if want is None:
            status[i] = "unexpected"
            if policies["unexpected"] != "ignore":
                sources = outputs.sources[i]
                what = ", ".join(sources) if sources != (name,) else name
                problems.append(
                    problem(
                        "CKM304",
                        "unexpected",
                        f"{what!r} maps to {name!r}, which the target does not have",
                        list(sources),
                        outputs.rules[i],
                        policies["unexpected"],
                    )
                )
        elif tuple(shapes[outputs.value[i]]) != want.shape:
            status[i], outputs.reason[i] = "skipped", "mismatch"
            mismatched[name] = i
            if policies["mismatch"] == "error":
                problems.append(_mismatch(program, builder, outputs.entry(i), want.shape))
    failed = {name: i for i, name in enumerate(outputs.target) if status[i] == "failed"}
    out = {
        name: _target_entry(program, builder, outputs, failed, landing, mismatched, used, name, m)
        for name, m in sorted(target.meta.items())
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


def _target_entry(
    program, builder, outputs, failed, landing, mismatched, used, name, meta
) -> TargetEntry:
    """Where one target key comes from (its tie is decided after all are known)."""
    base = {"target": name, "shape": list(meta.shape), "dtype": meta.dtype}
    i = landing.get(name)
    if i is not None and outputs.status[i] == "loaded":
        return TargetEntry(
            **base,
            status="loaded",
            sources=list(outputs.sources[i]),
            rules=list(outputs.rules[i]),
        )
    if name in mismatched:
        i = mismatched[name]
        return TargetEntry(
            **base,
            status="initialized",
            sources=list(outputs.sources[i]),
            reason="mismatch",
            rules=list(outputs.rules[i]),
        )
    if (init := _first_match(program.inits, name)) is not None:
        used.add(init.id)
        return TargetEntry(**base, status="initialized", reason="init", rules=[init.id])
    if name in failed:  # its provider failed: that problem is the one to read
        i = failed[name]
        return TargetEntry(
            **base,
            status="missing",
            sources=list(outputs.sources[i]),
            reason="failed",
            rules=list(outputs.rules[i]),
        )
    if name in builder.failed_names:  # what a failed merge or split would have made
        return TargetEntry(**base, status="missing", reason="failed")
    return TargetEntry(**base, status="missing")


def _unused_problems(
    program: Program,
    unused: list[int],
    source: Described,
    outputs: _Outputs,
    targets: list[TargetEntry] | None,
    policies: dict[str, str],
) -> list[Problem]:
    """Each unused rule that is not `optional`, with the keys it nearly matched: first the
    unexpected and missing ones (where a typo's key would be), then any source key."""
    unused = [i for i in unused if not program.rules[i].node.optional]
    if not unused:  # optional rules may match nothing: nothing to say
        return []
    troubled = [
        name
        for name, status in zip(outputs.target, outputs.status, strict=True)
        if status == "unexpected"
    ]
    troubled += [t.target for t in targets or () if t.status == "missing"]
    pools = [troubled, list(source.meta), outputs.target]
    found = []
    keys = sorted(source.meta)
    for i in unused:
        rule = program.rules[i]
        said = f"unused rule: {rule.where()} matches no key"
        consumed = next((k for k in keys if rule.matches_source(k)), None)
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
