"""The Report: what happened to every source and target key, and why.

Invariant: every source tensor is in exactly one of loaded / skipped /
unexpected; every target key in exactly one of loaded / initialized / missing.
`str(report)` is a compact summary that collapses layer ranges.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Iterable
from operator import itemgetter
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel

from .errors import summarize

if TYPE_CHECKING:
    from .plan import Plan, Problem


class RuleRef(BaseModel):
    """A rule as a report names it: its text and where it is written."""

    text: str
    file: str | None = None
    line: int | None = None
    column: int | None = None

    def __str__(self) -> str:
        if self.line is None:
            return self.text
        return f"{self.text} ({self.file or '<rules>'}:{self.line}:{self.column})"


class Loaded(BaseModel):
    """A target key loaded from source tensors (or tied to a loaded key)."""

    source: str | None  # the one source, when there is exactly one
    sources: list[str] = []
    target: str
    shape: list[int]
    rules: list[RuleRef] = []
    tied_to: str | None = None


class Skipped(BaseModel):
    """A source tensor dropped on purpose: by `skip`, by `init`, or by `on mismatch skip`."""

    source: str
    target: str
    reason: str
    rules: list[RuleRef] = []


class Unexpected(BaseModel):
    """A source tensor whose final name the target does not have."""

    source: str
    target: str
    rules: list[RuleRef] = []


class Failed(BaseModel):
    """A source tensor a problem of the plan stopped (an op that does not fit, two sources on
    one name): only a plan with errors has these, and such a plan is never executed."""

    source: str
    target: str
    reason: str
    rules: list[RuleRef] = []


class Missing(BaseModel):
    """A target key that nothing provides."""

    target: str
    shape: list[int]


class Initialized(BaseModel):
    """A target key that keeps its fresh initialization (`init`, or a skipped mismatch)."""

    target: str
    reason: str
    rules: list[RuleRef] = []


class Mismatched(BaseModel):
    """A source and target whose shapes differ (the source is skipped, the target initialized)."""

    source: str  # the sources, comma-separated when several made the tensor
    target: str
    source_shape: list[int]  # the tensor the target would get (after the rules' ops)
    target_shape: list[int]
    rules: list[RuleRef] = []
    file_shapes: list[list[int]] = []  # the sources' shapes in the file, where ops changed them


class Report(BaseModel):
    """What a plan did: every source and target key, the rules that decided, what was frozen."""

    loaded: list[Loaded] = []
    skipped: list[Skipped] = []
    unexpected: list[Unexpected] = []
    failed: list[Failed] = []
    missing: list[Missing] = []
    initialized: list[Initialized] = []
    mismatched: list[Mismatched] = []
    unused_rules: list[RuleRef] = []
    frozen: list[str] = []
    warnings: list[str] = []
    plan_fingerprint: str = ""

    @classmethod
    def from_plan(cls, plan: Plan, frozen: list[str] | None = None) -> Report:
        def refs(ids: Iterable[int]) -> list[RuleRef]:
            out = []
            for i in ids:
                info = plan.rules[i]
                span = info.span
                out.append(
                    RuleRef(
                        text=info.text,
                        file=span.file if span else None,
                        line=span.line if span else None,
                        column=span.column if span else None,
                    )
                )
            return out

        report = cls(plan_fingerprint=plan.fingerprint)
        targets = {t.target: t for t in plan.targets or ()}
        in_file = {e.source: e.shape for e in plan.sources}
        for o in plan.outputs:
            if o.status == "loaded" and not o.sources:  # made by a history's fill: initialized
                continue
            if o.status == "loaded":
                report.loaded.append(
                    Loaded(
                        source=o.sources[0] if len(o.sources) == 1 else None,
                        sources=o.sources,
                        target=o.target,
                        shape=o.shape,
                        rules=refs(o.rules),
                    )
                )
            elif o.reason == "mismatch":
                report.mismatched.append(
                    Mismatched(
                        source=", ".join(o.sources),
                        target=o.target,
                        source_shape=o.shape,
                        target_shape=targets[o.target].shape,
                        rules=refs(o.rules),
                        file_shapes=[]
                        if [in_file[s] for s in o.sources] == [o.shape]
                        else [in_file[s] for s in o.sources],
                    )
                )
        for e in plan.sources:
            if e.status == "unexpected":
                report.unexpected.append(
                    Unexpected(source=e.source, target=e.target, rules=refs(e.rules))
                )
            elif e.status in ("skipped", "failed"):  # each with the reason it was stopped
                kind, default = (Skipped, "skip") if e.status == "skipped" else (Failed, "error")
                getattr(report, e.status).append(
                    kind(
                        source=e.source,
                        target=e.target,
                        reason=e.reason or default,
                        rules=refs(e.rules),
                    )
                )
        for t in plan.targets or ():
            if t.status == "loaded" and t.reason == "tied":
                report.loaded.append(
                    Loaded(source=None, target=t.target, shape=t.shape, tied_to=t.tied_to)
                )
            elif t.status == "initialized":
                report.initialized.append(
                    Initialized(target=t.target, reason=t.reason or "init", rules=refs(t.rules))
                )
            elif t.status == "missing":
                report.missing.append(Missing(target=t.target, shape=t.shape))
        report.unused_rules = refs(plan.unused_rules)
        report.frozen = sorted(
            frozen if frozen is not None else (t.target for t in plan.trainable if t.frozen)
        )
        report.warnings = render_problems(plan.warnings, plan)
        return report

    def accounts_for(self, source_keys: Iterable[str], target_keys: Iterable[str] = ()) -> bool:
        """The accounting invariant: each source key and each target key in exactly one place."""
        loaded_sources = {s for e in self.loaded for s in e.sources}  # a split feeds several
        sources = sorted(
            [*loaded_sources]
            + [e.source for e in self.skipped]
            + [e.source for e in self.unexpected]
            + [e.source for e in self.failed]
        )
        target_keys = sorted(target_keys)
        if not target_keys:
            return sources == sorted(source_keys)
        wanted = set(target_keys)
        loaded = {e.target for e in self.loaded if e.target in wanted}  # two sources: one key
        initialized = [e.target for e in self.initialized]
        missing = [e.target for e in self.missing]
        places = [*loaded, *initialized, *missing]
        return (
            sources == sorted(source_keys)
            and len(places) == len(set(places))
            and set(places) == wanted
        )

    def __str__(self) -> str:
        counts = [
            ("loaded", len(self.loaded)),
            ("skipped", len(self.skipped)),
            ("unexpected", len(self.unexpected)),
            ("missing", len(self.missing)),
            ("initialized", len(self.initialized)),
            ("mismatched", len(self.mismatched)),
            ("frozen", len(self.frozen)),
        ]
        if self.failed:  # a plan with errors, looked at: say what its problems stopped
            counts.insert(3, ("failed", len(self.failed)))
        lines = ["ckptmap report: " + ", ".join(f"{n} {what}" for what, n in counts)]

        def section(title: str, keys: list[str], by: dict[str, list[str]] | None = None) -> None:
            if not keys:
                return
            lines.append(f"{title} ({len(keys)}):")
            groups = by or {"": keys}
            for why, names in groups.items():
                suffix = f"    <- {why}" if why else ""
                lines.extend(f"  {k}{suffix}" for k in summarize(_collapsed(names), 12))

        section("loaded", [e.target for e in self.loaded])
        section("skipped", [e.source for e in self.skipped], _by_rule(self.skipped, "source"))
        section("unexpected", [e.source for e in self.unexpected])
        section("failed", [e.source for e in self.failed], _by_rule(self.failed, "source"))
        section("missing", [e.target for e in self.missing])
        section(
            "initialized",
            [e.target for e in self.initialized],
            _by_rule(self.initialized, "target"),
        )
        if self.mismatched:
            lines.append(f"mismatched ({len(self.mismatched)}):")
            lines.extend(
                summarize(
                    f"  {m.source} {shape_change(m.file_shapes, m.source_shape)} -> "
                    f"{m.target} {m.target_shape}"
                    for m in self.mismatched
                )
            )
        section("frozen", self.frozen)
        if self.unused_rules:
            lines.append(f"unused rules ({len(self.unused_rules)}):")
            lines.extend(f"  {r}" for r in self.unused_rules)
        if self.warnings:
            lines.append("warnings:")
            lines.extend(f"  {w}" for w in self.warnings)
        return "\n".join(lines)


def _by_rule(entries: list, attr: str) -> dict[str, list[str]]:
    groups: dict[str, list[str]] = defaultdict(list)
    for e in entries:
        why = str(e.rules[-1]) if e.rules else ""
        if e.reason == "mismatch":
            why = "on mismatch skip"
        elif isinstance(e, Failed):
            why = f"{e.reason}: {why}" if why else e.reason
        groups[why].append(getattr(e, attr))
    return dict(groups)


# --- collapsing layer ranges -----------------------------------------------------------------

_NUMBERED = re.compile(r"(\D*?)(0|[1-9]\d{0,17})")  # longer digit runs are names, not indices


def collapse_keys(keys: Iterable[str]) -> list[tuple[str, int]]:
    """Keys with numbered segments folded into ranges: [('layers.{0..11}.q.weight', 12), …].

    Keys of the same shape (the same text but for numbers) fold position by
    position, so full grids fold too (`layers.{0..3}.experts.{0..7}.w1`).
    Numbers that move together in every key (a layer index in a source and in
    its target: `h.{0..11}.attn -> blocks.{0..11}.attn`) fold as one.
    """
    groups = _numbered_groups(keys if isinstance(keys, list) else list(keys))
    out = []
    for template, vectors in groups.items():
        classes = _linked_positions(vectors)
        columns = list(zip(*vectors, strict=True))
        # a class with one number in every key folds nothing: left out of the folding
        varying = [i for i, c in enumerate(classes) if len(set(columns[c[0]])) > 1]
        entries = _fold_last(vectors, [classes[i][0] for i in varying])
        for pos in reversed(range(len(varying) - 1)):
            merged: dict[tuple, list] = {}
            for entry, count in entries.items():
                slot = entry[:pos] + entry[pos + 1 :]
                if slot in merged:
                    merged[slot][0] |= entry[pos]
                    merged[slot][1] += count
                else:
                    merged[slot] = [set(entry[pos]), count]
            entries = {
                (*slot[:pos], frozenset(nums), *slot[pos:]): count
                for slot, (nums, count) in merged.items()
            }
        class_of = {p: i for i, c in enumerate(classes) for p in c}
        where = {ci: i for i, ci in enumerate(varying)}
        for entry, count in entries.items():
            parts, k = [], 0
            for seg in template:
                if isinstance(seg, tuple):
                    ci = class_of[k]
                    held = entry[where[ci]] if ci in where else {columns[classes[ci][0]][0]}
                    parts.append(seg[0] + format_numbers(sorted(held)))
                    k += 1
                else:
                    parts.append(seg)
            out.append((".".join(parts), count))
    return out


def _numbered_groups(
    keys: list[str], by_template: bool = True
) -> dict[tuple, list[tuple[int, ...]]]:
    """Keys by their text but for numbers (a segment's trailing index), with those numbers,
    in the keys' order: the work of folding that is done once per key.

    Keys that share a digit template (every ASCII digit as '#') are read together: the
    template says which digit runs are numbers, and one `findall` over all of them reads
    the runs. What the template cannot decide (a zero-padded run, a name with no plain
    ASCII text, a '#' in a name) is read key by key, as is everything without `by_template`
    (the definition the shortcut is tested against).
    """
    shared: dict[str, list[int]] = {}
    joined = "\n".join(keys)
    plain = (
        by_template
        and bool(keys)
        and joined.isascii()
        and "#" not in joined
        and joined.count("\n") == len(keys) - 1
    )
    if plain:
        templates = joined.encode().translate(_HASH_DIGITS).decode().split("\n")
        for i, t in enumerate(templates):
            shared.setdefault(t, []).append(i)
    # chunks: (first index, parts, key indexes, vectors)
    chunks: list[tuple[int, tuple, list[int], list[tuple[int, ...]]]] = []
    slow: list[int] = [] if plain else list(range(len(keys)))
    for template, indexes in shared.items():
        found = _template_numbers(template, [keys[i] for i in indexes])
        if found is None:
            slow += indexes
        else:
            chunks.append((indexes[0], found[0], indexes, found[1]))
    if slow:
        seen: dict[str, tuple[Any, int | None]] = {}  # segment -> (its part, its number)
        for i in sorted(slow):
            parts: list[Any] = []
            numbers: list[int] = []
            for seg in keys[i].split("."):
                known = seen.get(seg)
                if known is None:
                    m = _NUMBERED.fullmatch(seg)
                    known = seen[seg] = ((m.group(1),), int(m.group(2))) if m else (seg, None)
                parts.append(known[0])
                if known[1] is not None:
                    numbers.append(known[1])
            chunks.append((i, tuple(parts), [i], [tuple(numbers)]))
    by_parts: dict[tuple, list[tuple]] = {}
    for chunk in sorted(chunks, key=itemgetter(0)):  # groups in the order their first key came
        by_parts.setdefault(chunk[1], []).append(chunk)
    groups: dict[tuple, list[tuple[int, ...]]] = {}
    for text, held in by_parts.items():
        if len(held) == 1:
            groups[text] = held[0][3]
            continue
        indexes = [i for c in held for i in c[2]]
        vectors = [v for c in held for v in c[3]]
        order = sorted(range(len(indexes)), key=indexes.__getitem__)
        groups[text] = [vectors[k] for k in order]
    return groups


_HASH_DIGITS = bytes.maketrans(b"0123456789", b"#" * 10)


def _template_numbers(template: str, keys: list[str]) -> tuple[tuple, list] | None:
    """The parts and the number vectors of keys that share an ASCII digit template, or None
    when some run would be read differently from key to key (a zero-padded index). The
    template fixes where each run stands, so a run is the same slice of every key."""
    parts: list[Any] = []
    places: list[tuple[int, int]] = []  # (start, end) of each run that is a number
    at = 0
    for seg in template.split("."):
        runs = [m.span() for m in _RUNS_OF_HASH.finditer(seg)]
        head = seg.rstrip("#")
        if len(runs) == 1 and head != seg and len(seg) - len(head) <= 18:  # a trailing index
            parts.append((head,))
            places.append((at + len(head), at + len(seg)))
        elif runs:
            return None  # digits inside a name: the name differs from key to key
        else:
            parts.append(seg)
        at += len(seg) + 1
    if not places:
        return tuple(parts), [()] * len(keys)
    columns = []
    for start, end in places:
        column = [k[start:end] for k in keys]
        if end - start > 1 and _padded(column):
            return None
        columns.append(list(map(int, column)))
    return tuple(parts), list(zip(*columns, strict=True))


_RUNS_OF_HASH = re.compile(r"#+")


def _padded(column: list[str]) -> bool:
    """Whether a run of two digits or more starts with 0 (`01`: a name, not a number)."""
    return re.search(r"(?:^|\n)0[0-9]", "\n".join(column)) is not None


def _fold_last(vectors: list[tuple[int, ...]], firsts: list[int]) -> dict[tuple, int]:
    """The first fold, on plain numbers (most of the work: one entry per key): vectors
    that differ only in the last class's number become one entry with all of them."""
    if not firsts:
        return {(): len(vectors)}
    columns = list(zip(*vectors, strict=True))
    *head, last = firsts
    merged: dict[tuple[int, ...], list] = {}
    slots = zip(*(columns[p] for p in head), strict=True) if head else [()] * len(vectors)
    for slot, n in zip(slots, columns[last], strict=True):
        found = merged.get(slot)
        if found is None:
            merged[slot] = [{n}, 1]
        else:
            found[0].add(n)
            found[1] += 1
    return {
        (*(frozenset([n]) for n in slot), frozenset(nums)): count
        for slot, (nums, count) in merged.items()
    }


def _linked_positions(vectors: list[tuple[int, ...]]) -> list[list[int]]:
    """Positions that hold the same number in every vector, grouped: equal columns."""
    columns = list(zip(*vectors, strict=True))
    classes: list[list[int]] = []
    for p, column in enumerate(columns):
        for cls in classes:
            if columns[cls[0]] == column:
                cls.append(p)
                break
        else:
            classes.append([p])
    return classes


def _collapsed(keys: Iterable[str]) -> list[str]:
    return [key for key, _ in collapse_keys(keys)]


def format_numbers(numbers: list[int]) -> str:
    """[3] -> '3'; [0,1,2,3] -> '{0..3}'; [0,1,2,5] -> '{0..2,5}'."""
    if len(numbers) == 1:
        return str(numbers[0])
    runs, start, prev = [], numbers[0], numbers[0]
    for n in [*numbers[1:], None]:
        if n is not None and n == prev + 1:
            prev = n
            continue
        runs.append(
            str(start)
            if start == prev
            else f"{start}..{prev}"
            if prev > start + 1
            else f"{start},{prev}"
        )
        if n is not None:
            start = prev = n
    return "{" + ",".join(runs) + "}"


# --- rendering plans and problems ------------------------------------------------------------


def render_problems(
    problems: list[Problem], plan: Plan | None = None, limit: int = 20
) -> list[str]:
    """Problems as lines a person reads: per-key messages, long key lists collapsed."""
    lines: list[str] = []
    by_kind: dict[str, list[Problem]] = defaultdict(list)
    for p in problems:
        by_kind[p.kind].append(p)
    for kind, group in by_kind.items():
        if kind in ("missing", "unexpected") and len(group) > 1:
            policy = plan.policies.get(kind, "error") if plan else group[0].severity
            keys = [p.keys[0] for p in group]
            what = (
                "target keys nothing provides"
                if kind == "missing"
                else ("source keys the target does not have")
            )
            lines.append(f"{kind} (on {kind} {policy}): {len(keys)} {what}:")
            lines.extend(f"  {k}" for k in summarize(_collapsed(keys), limit))
        else:
            lines.extend(summarize([p.message for p in group], limit))
    return lines


def shape_change(before: list[list[int]], after: list[int]) -> str:
    """`[64, 192] -> [192, 64]` where ops changed the shape (merges: `[8, 8] + [2, 8] -> …`);
    the shape alone where they did not."""
    if (len(before) == 1 and before[0] == after) or not before:
        return str(list(after))
    return " + ".join(str(list(b)) for b in before) + f" -> {list(after)}"


def render_plan(plan: Plan) -> str:
    """One line per tensor the plan makes (sources -> target, shape, status, rules), then the rest."""
    n_out = len(plan.outputs)
    lines = [f"plan {plan.fingerprint[:19]}  ({len(plan.sources)} source keys, {n_out} outputs)"]
    shapes = {e.source: e.shape for e in plan.sources}
    for o in plan.outputs:
        made_of = " + ".join(o.sources)
        status = o.status if not o.reason else f"{o.status} ({o.reason})"
        arrow = o.target if made_of == o.target else f"{made_of} -> {o.target}"
        via = "; ".join(plan.rules[i].text for i in o.rules)
        shape = shape_change([shapes[s] for s in o.sources if s in shapes], o.shape)
        lines.append(f"  {arrow}  {shape}  {status}" + (f"  [{via}]" if via else ""))
    for e in plan.sources:
        if e.reason == "skip":
            via = "; ".join(plan.rules[i].text for i in e.rules)
            lines.append(f"  {e.source}  {e.shape}  skipped  [{via}]")
    for t in plan.targets or ():
        if t.status != "loaded" or t.reason == "tied":
            extra = f" ({t.reason})" if t.reason else ""
            lines.append(f"  target {t.target}  {t.shape}  {t.status}{extra}")
    if plan.problems:
        lines.append("problems:")
        lines.extend(f"  {line}" for line in render_problems(plan.problems, plan))
    if plan.unused_rules:
        lines.append("unused rules:")
        lines.extend(f"  {plan.rules[i]}" for i in plan.unused_rules)
    return "\n".join(lines)
