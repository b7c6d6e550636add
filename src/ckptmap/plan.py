"""Planning: a Program bound to concrete key sets, from names, shapes and dtypes only.

A `Plan` says, for every source tensor, what it becomes and which rules
decided that; for every target key, where it comes from. It is plain data:
deterministic (independent of dict order), JSON-serializable, fingerprinted,
and validated (conflicts, shape mismatches, missing and unexpected keys under
the policies) before any tensor is read.
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import json
from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass, field
from operator import attrgetter
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel

from .errors import PlanError, Span
from .meta import Described, TensorMeta, dtype_name, itemsize  # noqa: F401 (their old home)
from .ops import Meta, Op, OpError
from .patterns import Matcher, PatternError
from .rules import Strip, arg_text
from .version import __version__

if TYPE_CHECKING:
    from torch import Tensor

    from .compile import Program, Rule
    from .report import Report


# --- the plan, as data ---------------------------------------------------------------------


class RuleInfo(BaseModel):
    """A rule of the program, as the plan and report name it."""

    id: int
    text: str
    span: Span | None = None

    def __str__(self) -> str:
        return f"{self.text} ({self.span})" if self.span else self.text


# The per-key records are slotted dataclasses, not pydantic models: a plan of a 100k-key
# checkpoint makes hundreds of thousands of them, and a model instance costs several times
# more to make. Pydantic still validates them inside `Plan` (JSON in, JSON Schema out).


@dataclass(slots=True, kw_only=True)
class Value:
    """A tensor the plan knows by shape and dtype: a source, an intermediate, or an output."""

    shape: list[int]
    dtype: str | None = None


@dataclass(slots=True, kw_only=True)
class Step:
    """One op of the plan: `outputs = op(*inputs)`, by value number; `rule` wrote it."""

    op: str
    args: list[Any] = field(default_factory=list)
    inputs: list[int]
    outputs: list[int]
    rule: int


@dataclass(slots=True, kw_only=True)
class SourceEntry:
    """What one source tensor becomes."""

    source: str
    value: int
    target: str  # the name it ends under (merged: the merged tensor; split: the first piece)
    shape: list[int]
    dtype: str | None = None
    status: Literal["loaded", "skipped", "unexpected", "failed"]
    reason: (
        Literal["skip", "init", "mismatch", "op", "merge", "split", "name", "conflict"] | None
    ) = None
    rules: list[int] = field(default_factory=list)  # the rules that matched this key, in order


@dataclass(slots=True, kw_only=True)
class OutputEntry:
    """One tensor the plan produces: its name, its value, the sources it is made of."""

    target: str
    value: int
    shape: list[int]
    dtype: str | None = None
    sources: list[str]
    # failed: a problem of the plan stops it (an op that does not fit, two sources on one name)
    status: Literal["loaded", "skipped", "unexpected", "failed"]
    reason: Literal["init", "mismatch", "op", "merge", "split", "name", "conflict"] | None = None
    rules: list[int] = field(default_factory=list)


@dataclass(slots=True, kw_only=True)
class TargetEntry:
    """Where one target key comes from."""

    target: str
    shape: list[int]
    dtype: str | None = None
    status: Literal["loaded", "initialized", "missing"]
    sources: list[str] = field(default_factory=list)
    reason: Literal["tied", "init", "mismatch", "failed"] | None = None  # failed: its provider did
    tied_to: str | None = None
    rules: list[int] = field(default_factory=list)


class Problem(BaseModel):
    """Something the policies do not allow (error) or want said (warning)."""

    code: str
    kind: Literal[
        "conflict",
        "mismatch",
        "missing",
        "unexpected",
        "unused",
        "name",
        "op",
        "merge",
        "split",
        "lossy",
    ]
    severity: Literal["error", "warning"]
    message: str
    keys: list[str]
    rules: list[int] = []


class Trainable(BaseModel):
    """The freeze/unfreeze decision for one target key: the last matching rule wins."""

    target: str
    frozen: bool
    rule: int


class Plan(BaseModel):
    """The program bound to concrete keys. Plain data: print it, diff it, save it as JSON.

    `sources` says what each source tensor becomes, `outputs` what the plan
    produces, `steps` the tensor ops between them (by value number, into
    `values`), `targets` where each target key comes from.
    """

    ckptmap: str = __version__
    rules_fingerprint: str
    rules: list[RuleInfo]
    policies: dict[str, str]
    values: list[Value] = []
    sources: list[SourceEntry]
    steps: list[Step] = []
    outputs: list[OutputEntry] = []
    targets: list[TargetEntry] | None = None
    problems: list[Problem] = []
    unused_rules: list[int] = []
    trainable: list[Trainable] = []
    fingerprint: str = ""

    # --- looking at it ---
    @property
    def errors(self) -> list[Problem]:
        return [p for p in self.problems if p.severity == "error"]

    @property
    def warnings(self) -> list[Problem]:
        return [p for p in self.problems if p.severity == "warning"]

    @property
    def ok(self) -> bool:
        """True when nothing in the plan is an error under its policies."""
        return not self.errors

    @property
    def mapping(self) -> dict[str, str]:
        """Source key -> the name it is loaded under (merged: the merged tensor)."""
        return {e.source: e.target for e in self.sources if e.status == "loaded"}

    def check(self) -> Plan:
        """Raise `PlanError` listing every error; return the plan when it has none."""
        if self.errors:
            from .report import render_problems

            n = len(self.errors)
            raise PlanError(
                f"the plan has {n} problem{'s' * (n != 1)} under its policies",
                code=self.errors[0].code,
                problems=self.errors,
                details=render_problems(self.errors, self),
            )
        return self

    def to_json(self, indent: int | None = 2) -> str:
        """The plan as JSON (what `ckptmap plan --json` prints); `Plan.from_json` reads it."""
        return self.model_dump_json(indent=indent)

    @classmethod
    def from_json(cls, text: str | bytes, where: Any = None) -> Plan:
        """A plan saved with `to_json` / `plan --json`, checked against its own fingerprint
        (a plan edited by hand or cut short is refused)."""
        from pydantic import ValidationError

        from .errors import CheckpointError, UsageError

        name = f"{where}: " if where is not None else ""
        if not isinstance(text, (str, bytes)):
            raise UsageError(
                f"Plan.from_json takes the JSON text, not a {type(text).__name__}",
                hint="Plan.from_json(Path('plan.json').read_text())",
            )
        if isinstance(text, str) and text.strip().endswith(".json") and "\n" not in text.strip():
            raise UsageError(
                f"{text.strip()!r} looks like a file name; Plan.from_json takes the JSON text",
                hint=f"Plan.from_json(Path({text.strip()!r}).read_text())",
            )
        try:
            plan = cls.model_validate_json(text)
        except ValidationError as e:
            err = e.errors()[0]
            field = ".".join(str(p) for p in err["loc"])
            raise CheckpointError(
                f"{name}not a ckptmap plan ({field + ': ' if field else ''}{err['msg']})",
                code="CKM542",
                hint="save one with `ckptmap plan RULES -s SOURCE --json > plan.json`",
            ) from None
        if plan.fingerprint != fingerprint_of(plan):
            raise CheckpointError(
                f"{name}the plan's content does not match its fingerprint {plan.fingerprint[:19]} "
                "(edited or cut short)",
                code="CKM542",
            )
        return plan

    def report(self, frozen: list[str] | None = None) -> Report:
        from .report import Report

        return Report.from_plan(self, frozen=frozen)

    def __str__(self) -> str:
        from .report import render_plan

        return render_plan(self)

    # --- running it ---
    def apply(self, source: Any) -> dict[str, Tensor]:
        """The mapped state_dict: renamed tensors are the source's own objects, never copied."""
        from .apply import apply_plan

        return apply_plan(self, source)

    def inverse(self, allow_lossy: bool = False) -> Plan:
        """The plan that maps this plan's outputs back to its sources, key by key.

        Built from the concrete entries (never by inverting patterns): each step
        is replaced by its exact inverse for the shapes it saw. Raises PlanError
        listing what cannot be restored exactly (skipped sources, lossy steps)
        unless `allow_lossy`, which then restores what it can.
        """
        from .reverse import invert

        return invert(self, allow_lossy)


def fingerprint_of(plan: Plan) -> str:
    """A hash of what the plan does: spans and file paths do not count.

    Every field of the plan but `fingerprint`, `ckptmap` and the rules' spans is
    fed in (a new field must be added here too), as compact JSON rows.
    """
    digest = hashlib.sha256()

    def feed(rows: Any) -> None:
        digest.update(json.dumps(rows, separators=(",", ":"), check_circular=False).encode())
        digest.update(b"\n")

    feed([plan.rules_fingerprint, [r.text for r in plan.rules], plan.policies])
    feed([[v.shape, v.dtype] for v in plan.values])
    feed(
        [
            [e.source, e.value, e.target, e.shape, e.dtype, e.status, e.reason, e.rules]
            for e in plan.sources
        ]
    )
    feed([[s.op, s.args, s.inputs, s.outputs, s.rule] for s in plan.steps])
    feed(
        [
            [o.target, o.value, o.shape, o.dtype, o.sources, o.status, o.reason, o.rules]
            for o in plan.outputs
        ]
    )
    feed(
        None
        if plan.targets is None
        else [
            [t.target, t.shape, t.dtype, t.status, t.sources, t.reason, t.tied_to, t.rules]
            for t in plan.targets
        ]
    )
    feed([[p.code, p.kind, p.severity, p.message, p.keys, p.rules] for p in plan.problems])
    feed([plan.unused_rules, [[t.target, t.frozen, t.rule] for t in plan.trainable]])
    return "sha256:" + digest.hexdigest()


# --- building it ---------------------------------------------------------------------------


@dataclass(slots=True)
class _Node:
    """A tensor alive in the pipeline: its current name, value, the sources it is made of."""

    name: str
    value: int
    sources: tuple[str, ...]
    rules: list[int]
    order: tuple[int, ...] = ()  # where it stands in the output: source index, then piece
    template: str | None = None  # its name with every digit as '#': its bucket
    failed: str | None = None  # the kind of problem that stopped it (op, merge, split)


# Keys that differ only in their numbers (layer 0..79, expert 0..255) share a template;
# a string pattern without digits matches all of a template's keys or none of them, so
# a rule is tried once per template, not once per key.
_DIGIT_BYTES = bytes.maketrans(b"0123456789", b"##########")


def _template(name: str) -> str:
    """`name` with every ASCII digit as '#' (bytes.translate is several times faster than
    str.translate, and UTF-8 never uses the digits' bytes inside other characters)."""
    return (
        name.encode("utf-8", "surrogatepass")
        .translate(_DIGIT_BYTES)
        .decode("utf-8", "surrogatepass")
    )


def _bucket_test(rule: Rule) -> Any:
    """A test on templates that rules out buckets no key of which can match, or None.

    Digits in a pattern become '#' too: a key that matches the pattern has a
    template that matches the pattern so rewritten (each key is still checked).
    """
    from .rules import Merge, Prefix, Strip

    node = rule.node
    if isinstance(node, Prefix):
        return None
    if isinstance(node, Strip):
        text = _template(node.prefix)
        return lambda t: t.startswith(text)
    matchers = rule.matchers if isinstance(node, Merge) else (rule.matcher,)
    if any(m is None or m.is_regex for m in matchers):
        return None
    try:
        hashed = [Matcher(_hash_literals(m.text)) for m in matchers]
    except PatternError:
        return None
    return lambda t: any(m.match(t) is not None for m in hashed)


def _has_digits(text: str) -> bool:
    return _template(text) != text or "#" in text


def _whole_buckets(rule: Rule) -> bool:
    """Whether a strip/prefix/rename/skip decides whole buckets exactly."""
    from .rules import Prefix, Strip

    node = rule.node
    if isinstance(node, Prefix):
        return True
    if isinstance(node, Strip):
        return not _has_digits(node.prefix)
    return (
        rule.matcher is not None
        and not rule.matcher.is_regex
        and not _has_digits(rule.matcher.text)
    )


def _recipe(rule: Rule, template: str) -> Any:
    """How a bucket's keys change under a rule: parts (text, or (start, end) of the key), SKIP,
    or None when the rule does not match the bucket."""
    from .compile import SKIP
    from .rules import Prefix, Skip, Strip

    node = rule.node
    if isinstance(node, Prefix):
        return [node.prefix, (0, None)]
    if isinstance(node, Strip):
        return [(len(node.prefix), None)] if template.startswith(node.prefix) else None
    found = rule.matcher.spans(template)  # type: ignore[union-attr]
    if found is None:
        return None
    if isinstance(node, Skip):
        return SKIP
    captures, rest = found
    parts: list = [p if isinstance(p, str) else captures[p[0]] for p in rule.template.parts]
    if rest is not None:
        empty = not any(parts)  # a rename to "" drops the matched segments and their dot
        parts.append((rest[0] + 1, rest[1]) if empty else rest)
    return parts


def _cook(parts: list, keys: list[str]) -> list[str]:
    """The keys rewritten by a recipe, part by part over all of them (one join per key)."""
    columns = [
        [p] * len(keys) if isinstance(p, str) else [k[p[0] : p[1]] for k in keys] for p in parts
    ]
    return list(map("".join, zip(*columns, strict=True))) if columns else [""] * len(keys)


def _hash_literals(text: str) -> str:
    """Digits outside `{captures}` as '#'."""
    out, depth = [], 0
    for ch in text:
        depth += ch == "{"
        out.append(_template(ch) if depth == 0 else ch)
        depth -= ch == "}" and depth > 0
    return "".join(out)


class _Builder:
    """Runs the pipeline statement by statement over every key (merges need whole groups)."""

    def __init__(self, program: Program, source: Described):
        self.program = program
        self.values: list[Value] = []
        self.steps: list[Step] = []
        self.problems: list[Problem] = []
        self.used: set[int] = set()
        self.dropped: list[_Node] = []  # skipped by a `skip` rule
        self.source_values: dict[str, int] = {}
        self._made_by: tuple[list, dict[int, Step], dict[int, str]] | None = None
        self.failed_names: set[str] = set()  # names a failed merge or split would have made
        self.buckets: dict[str, list[_Node]] = defaultdict(list)
        values, buckets, meta = self.values, self.buckets, source.meta
        for index, key in enumerate(sorted(meta)):  # the loop every key goes through: inlined
            shape, dtype = meta[key]
            self.source_values[key] = value = len(values)
            values.append(Value(shape=list(shape), dtype=dtype))
            template = _template(key)
            buckets[template].append(_Node(key, value, (key,), [], (index,), template))

    def _add(self, node: _Node) -> None:
        node.template = _template(node.name)
        self.buckets[node.template].append(node)

    def _candidates(self, rule: Rule) -> list[_Node]:
        test = _bucket_test(rule)
        out: list[_Node] = []
        for template, nodes in self.buckets.items():
            if test is None or test(template):
                out.extend(nodes)
        return out

    def _settle(self, changed: list[_Node], gone: list[_Node] = (), new: list[_Node] = ()) -> None:
        """Move renamed nodes to their templates' buckets; drop gone ones; add new ones."""
        touched = set()
        for n in changed:
            template = _template(n.name)
            if template != n.template:
                touched.add(n.template)
                n.template = template
                self.buckets[template].append(n)
        for n in gone:
            touched.add(n.template)
            n.template = None
        for t in touched:
            kept = [n for n in self.buckets[t] if n.template == t]
            if kept:
                self.buckets[t] = kept
            else:
                del self.buckets[t]
        for n in new:
            self._add(n)

    @property
    def live(self) -> list[_Node]:
        nodes = [n for bucket in self.buckets.values() for n in bucket]
        nodes.sort(key=attrgetter("order"))
        return nodes

    def _value(self, shape: Any, dtype: str | None) -> int:
        self.values.append(Value(shape=list(shape), dtype=dtype))
        return len(self.values) - 1

    def meta(self, value: int) -> Meta:
        v = self.values[value]
        return Meta(tuple(v.shape), v.dtype)

    def _run(self, op: Op, rule: Rule, inputs: list[int], names: list[str]) -> list[int] | None:
        """Add a step; on an op that does not fit, a problem naming keys, shapes and rule."""
        try:
            outs = op.infer([self.meta(v) for v in inputs])
            if not outs:
                raise OpError("it makes no tensor at all")
        except (OpError, IndexError, ValueError, TypeError, ZeroDivisionError, OverflowError) as e:
            # shape arithmetic on a shape the op was not written for (a 0-d tensor) is a
            # tensor that does not fit, like any other
            if not isinstance(e, OpError):
                e = OpError(f"not for a tensor of {len(self.meta(inputs[0]).shape)} dimensions")
            shapes = ", ".join(
                f"{n} {list(self.meta(v).shape)}" for n, v in zip(names, inputs, strict=True)
            )
            self.problems.append(
                _problem(
                    "CKM306",
                    "op",
                    f"{op!r} does not fit {shapes}: {e} ({rule.where()})",
                    names,
                    [rule.id],
                )
            )
            return None
        ids = [self._value(m.shape, m.dtype) for m in outs]
        self.steps.append(
            Step(
                op=op.name,
                args=[_jsonable(a) for a in op.args],
                inputs=inputs,
                outputs=ids,
                rule=rule.id,
            )
        )
        return ids

    def shaped_by(self, value: int) -> int | None:
        """The rule whose op made this value, or None for a tensor as the file holds it."""
        if not self.steps:
            return None
        self.history(value)  # fills the cache
        step = self._made_by[1].get(value) if self._made_by else None
        return step.rule if step is not None else None

    def history(self, value: int) -> str | None:
        """How a value was made from the file's tensors, as text: `head.bias [10] | pad(0, 0, 3)`;
        None when it is a source tensor as read."""
        if not self.steps:
            return None
        if self._made_by is None or len(self._made_by[0]) != len(self.steps):
            self._made_by = (
                list(self.steps),
                {out: step for step in self.steps for out in step.outputs},
                {v: k for k, v in self.source_values.items()},
            )
        _, made_by, sources = self._made_by

        def text(v: int) -> str:
            step = made_by.get(v)
            if step is None:
                return f"{sources.get(v, '?')} {self.values[v].shape}"
            ins = [text(i) for i in step.inputs]
            before = ins[0] if len(ins) == 1 else "(" + ", ".join(ins) + ")"
            op = f"{step.op}({', '.join(arg_text(a) for a in step.args)})"
            return (
                f"{before} | {op}"
                if step.outputs == [v]
                else f"{before} | {op}[{step.outputs.index(v)}]"
            )

        return text(value) if value in made_by else None

    def _chain(self, ops: tuple[Op, ...], rule: Rule, value: int, name: str) -> int | None:
        for op in ops:
            out = self._run(op, rule, [value], [name])
            if out is None:
                return None
            value = out[0]
        return value

    def run(self) -> list[_Node]:
        from .rules import Merge, Split, Transform

        for rule in self.program.steps:
            node = rule.node
            if isinstance(node, Transform):
                self._transform(rule)
            elif isinstance(node, Merge):
                self._merge(rule)
            elif isinstance(node, Split):
                self._split(rule)
            else:
                self._rename(rule)
        return self.live

    def _rename(self, rule: Rule) -> None:
        if _whole_buckets(rule):
            self._rename_buckets(rule)
            return
        from .compile import SKIP

        changed, gone = [], []
        for n in self._candidates(rule):
            out = rule.step(n.name)
            if out is None:
                continue
            self.used.add(rule.id)
            n.rules.append(rule.id)
            if out is SKIP:
                self.dropped.append(n)
                gone.append(n)
            else:
                n.name = out
                changed.append(n)
        self._settle(changed, gone)

    def _rename_buckets(self, rule: Rule) -> None:
        """A rule whose pattern has no digits treats a bucket as one key: it matches all of
        it or none, at the same places, so one match gives every key's new name by slicing."""
        from .compile import SKIP

        moves = []
        for template, nodes in list(self.buckets.items()):
            recipe = _recipe(rule, template)
            if recipe is None:
                continue
            self.used.add(rule.id)
            for n in nodes:
                n.rules.append(rule.id)
            if recipe is SKIP:
                self.dropped.extend(nodes)
                moves.append((template, None, nodes))
                continue
            for n, name in zip(nodes, _cook(recipe, [n.name for n in nodes]), strict=True):
                n.name = name
            moves.append((template, _template(_cook(recipe, [template])[0]), nodes))
        for template, _, _ in moves:
            del self.buckets[template]
        for _, new, nodes in moves:
            if new is None:
                continue
            for n in nodes:
                n.template = new
            self.buckets[new].extend(nodes)

    def _transform(self, rule: Rule) -> None:
        for n in self._candidates(rule):
            if rule.matcher.match(n.name) is None:  # type: ignore[union-attr]
                continue
            self.used.add(rule.id)
            n.rules.append(rule.id)
            value = self._chain(rule.ops, rule, n.value, n.name)
            if value is None:
                n.failed = "op"
            else:
                n.value = value

    def _merge(self, rule: Rule) -> None:
        template = rule.template
        outer = sorted({name for name, _ in template.refs})  # type: ignore[union-attr]
        groups: dict[tuple, dict[Any, _Node]] = {}
        captures: dict[tuple, dict[str, str]] = {}
        for n in sorted(self._candidates(rule), key=lambda n: n.order):
            for k, matcher in enumerate(rule.matchers):
                m = matcher.match(n.name)
                if m is None or m.rest:
                    continue
                key = tuple(m.captures[c] for c in outer)
                slot = m.captures[rule.gather] if rule.gather else k
                group = groups.setdefault(key, {})
                captures.setdefault(key, m.captures)
                if slot in group:
                    _fail([group[slot], n], "merge", rule)
                    self.problems.append(
                        _problem(
                            "CKM307",
                            "merge",
                            f"{group[slot].name!r} and {n.name!r} both fit the same place in "
                            f"{rule.where()}",
                            [group[slot].name, n.name],
                            [rule.id],
                        )
                    )
                else:
                    group[slot] = n
                break
        if groups:
            self.used.add(rule.id)
        merged: dict[int, _Node] = {}  # id(first member) -> the merged node
        gone: set[int] = set()
        for key, group in groups.items():
            where = ", ".join(f"{{{c}}}={v}" for c, v in zip(outer, key, strict=True))
            if rule.gather:
                order = sorted(group, key=lambda s: (not s.isdigit(), int(s) if s.isdigit() else s))
                want = [str(i) for i in range(len(order))]
                if order != want:
                    _fail(group.values(), "merge", rule)
                    self.failed_names.add(template.render(captures[key]))  # type: ignore[union-attr]
                    self.problems.append(
                        _problem(
                            "CKM307",
                            "merge",
                            f"{rule.where()}: {{{rule.gather}}} must run 0..{len(order) - 1} "
                            f"{'for ' + where if where else ''}, found {', '.join(order)}",
                            [group[s].name for s in order],
                            [rule.id],
                        )
                    )
                    continue
                members = [group[s] for s in order]
            else:
                missing = [
                    rule.node.patterns[k] for k in range(len(rule.matchers)) if k not in group
                ]
                if missing:
                    _fail(group.values(), "merge", rule)
                    self.failed_names.add(template.render(captures[key]))  # type: ignore[union-attr]
                    names = ", ".join(p.to_text() for p in missing)
                    self.problems.append(
                        _problem(
                            "CKM307",
                            "merge",
                            f"{rule.where()}{' for ' + where if where else ''}: nothing matches {names} "
                            f"(present: {', '.join(group[k].name for k in sorted(group))})",
                            [group[k].name for k in sorted(group)],
                            [rule.id],
                        )
                    )
                    continue
                members = [group[k] for k in range(len(rule.matchers))]
            name = template.render(captures[key])  # type: ignore[union-attr]
            names = [m.name for m in members]
            out = self._run(rule.ops[0], rule, [m.value for m in members], names)
            value = out and self._chain(rule.ops[1:], rule, out[0], name)
            if value is None:
                _fail(members, "op", rule)
                self.failed_names.add(name)
                continue
            rules = [*list(dict.fromkeys(r for m in members for r in m.rules)), rule.id]
            sources = tuple(dict.fromkeys(s for m in members for s in m.sources))  # merge order
            order = min(m.order for m in members)
            merged[id(members[0])] = _Node(name, value, sources, rules, order)
            gone.update(id(m) for m in members)
        members_gone = [n for group in groups.values() for n in group.values() if id(n) in gone]
        self._settle([], members_gone, list(merged.values()))

    def _split(self, rule: Rule) -> None:
        gone, new = [], []
        for n in sorted(self._candidates(rule), key=lambda n: n.order):
            m = rule.matcher.match(n.name)  # type: ignore[union-attr]
            if m is None or m.rest:
                continue
            self.used.add(rule.id)
            value = self._chain(rule.ops[:-1], rule, n.value, n.name)
            pieces = None if value is None else self._run(rule.ops[-1], rule, [value], [n.name])
            if pieces is None:
                _fail([n], "op", rule)
                if not rule.gather:
                    self.failed_names.update(t.render(m.captures) for t in rule.templates)
                continue
            if not pieces:  # unstack of an empty dimension: the tensor would vanish
                _fail([n], "split", rule)
                self.problems.append(
                    _problem(
                        "CKM309",
                        "split",
                        f"{rule.where()}: {n.name!r} splits into no pieces at all",
                        [n.name],
                        [rule.id],
                    )
                )
                continue
            if rule.gather:
                names = [
                    rule.templates[0].render({**m.captures, rule.gather: str(i)})
                    for i in range(len(pieces))
                ]
            elif len(rule.templates) != len(pieces):
                _fail([n], "split", rule)
                self.failed_names.update(t.render(m.captures) for t in rule.templates)
                self.problems.append(
                    _problem(
                        "CKM309",
                        "split",
                        f"{rule.where()}: {n.name!r} splits into {len(pieces)} pieces but "
                        f"{len(rule.templates)} targets are named",
                        [n.name],
                        [rule.id],
                    )
                )
                continue
            else:
                names = [t.render(m.captures) for t in rule.templates]
            rules = [*n.rules, rule.id]
            gone.append(n)
            new += [
                _Node(nm, v, n.sources, list(rules), (*n.order, i))
                for i, (nm, v) in enumerate(zip(names, pieces, strict=True))
            ]
        self._settle([], gone, new)


def _fail(nodes: Any, kind: str, rule: Rule) -> None:
    """Mark nodes stopped by a problem of `rule`: they are never shown as loaded."""
    for n in nodes:
        n.failed = n.failed or kind
        if rule.id not in n.rules:
            n.rules.append(rule.id)


def _jsonable(arg: Any) -> Any:
    return [_jsonable(a) for a in arg] if isinstance(arg, (list, tuple)) else arg


@contextlib.contextmanager
def _no_gc():
    """Planning allocates a few objects per key and frees none of them: with 100k keys the
    cyclic collector would rescan the growing heap again and again for nothing.

    On the way out everything made meanwhile is moved to the oldest generation (freeze,
    then unfreeze: two list splices) rather than left young, where the first collection
    after re-enabling would walk all of it at once. Skipped when the caller has frozen
    objects of its own: unfreezing would release them.
    """
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            if gc.get_freeze_count() == 0:
                gc.freeze()
                gc.unfreeze()
            gc.enable()


def build_plan(
    program: Program, source: Described, target: Described | None, policies: dict[str, str]
) -> Plan:
    with _no_gc():
        return _build_plan(program, source, target, policies)


def _build_plan(
    program: Program, source: Described, target: Described | None, policies: dict[str, str]
) -> Plan:
    builder = _Builder(program, source)
    live = builder.run()
    problems, used = builder.problems, builder.used

    # outputs: what the pipeline produced, then `init` on final names
    outputs: list[OutputEntry] = []
    inits = program.inits
    for n in live:
        name = n.name
        failed = n.failed
        if not name or name[0] == "." or name[-1] == "." or ".." in name:
            failed = failed or "name"
            problems.append(
                _problem(
                    "CKM305",
                    "name",
                    f"{', '.join(n.sources)} became {n.name!r}, not a valid key",
                    list(n.sources),
                    n.rules,
                )
            )
        status, reason, rules = "loaded", None, list(n.rules)
        init = _first_match(inits, name) if inits else None
        if failed is not None:
            status, reason = "failed", failed
        elif init is not None:
            used.add(init.id)
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

    # two tensors on one name: never silent
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
            _problem(
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

    targets = None
    if target is not None:
        targets = _match_target(
            program, builder, outputs, landing, target, policies, used, problems
        )

    sources = _source_entries(builder, outputs, source)

    trainable = []
    if not program.trainability:
        names = []
    elif target is not None:
        names = sorted(target.parameters if target.parameters is not None else target.meta)
    else:
        names = sorted(landing)
    for name in names:
        decided = _last_match(program.trainability, name)
        if decided is not None:
            used.add(decided.id)
            trainable.append(
                Trainable(target=name, frozen=decided.node.keyword == "freeze", rule=decided.id)
            )

    unused = [
        r.id
        for r in program.rules
        if r.id not in used
        and r.node.keyword not in ("on", "include")
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


def _source_entries(
    builder: _Builder, outputs: list[OutputEntry], source: Described
) -> list[SourceEntry]:
    """Each source's fate, from the tensors it ended in: loaded wins, then unexpected, then
    the first."""
    rank = {"failed": -1, "loaded": 0, "unexpected": 1}
    fates: dict[str, tuple[int, str, str | None, str, list[int]]] = {}

    def offer(key: str, status: str, reason: str | None, name: str, rules: list[int]) -> None:
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
    builder: _Builder,
    outputs: list[OutputEntry],
    landing: dict[str, list[OutputEntry]],
    target: Described,
    policies: dict[str, str],
    used: set[int],
    problems: list[Problem],
) -> list[TargetEntry]:
    mismatched: dict[str, OutputEntry] = {}
    for o in outputs:
        if o.status != "loaded":
            continue
        want = target.meta.get(o.target)
        what = ", ".join(o.sources) if o.sources != [o.target] else o.target
        if want is None:
            o.status = "unexpected"
            if policies["unexpected"] != "ignore":
                problems.append(
                    _problem(
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
                history = builder.history(o.value)
                if history is None:  # no op touched it: the file's shape is the one compared
                    said = f"{what} {list(o.shape)} -> {o.target} expects {list(want.shape)}"
                else:
                    said = (
                        f"{history} gives {list(o.shape)} for {o.target}, which expects "
                        f"{list(want.shape)}"
                    )
                # the rule that decided the shape: the one whose op made it, else the last
                decider = builder.shaped_by(o.value)
                if decider is None and o.rules:
                    decider = o.rules[-1]
                if decider is not None:
                    said += f" (via {program.rules[decider].where()})"
                problems.append(
                    _problem(
                        "CKM302",
                        "mismatch",
                        f"shape mismatch: {said}",
                        [*o.sources, o.target],
                        o.rules,
                    )
                )

    out: dict[str, TargetEntry] = {}
    failed = {o.target: o for o in outputs if o.status == "failed"}
    for name in sorted(target.meta):
        meta = target.meta[name]
        base = {"target": name, "shape": list(meta.shape), "dtype": meta.dtype}
        providers = [o for o in landing.get(name, ()) if o.status == "loaded"]
        if providers:
            out[name] = TargetEntry(
                **base, status="loaded", sources=providers[0].sources, rules=providers[0].rules
            )
        elif name in mismatched:
            o = mismatched[name]
            out[name] = TargetEntry(
                **base, status="initialized", sources=o.sources, reason="mismatch", rules=o.rules
            )
        elif (init := _first_match(program.inits, name)) is not None:
            used.add(init.id)
            out[name] = TargetEntry(**base, status="initialized", reason="init", rules=[init.id])
        elif name in failed:  # its provider failed: that problem is the one to read
            o = failed[name]
            out[name] = TargetEntry(
                **base, status="missing", sources=o.sources, reason="failed", rules=o.rules
            )
        elif name in builder.failed_names:  # what a failed merge or split would have made
            out[name] = TargetEntry(**base, status="missing", reason="failed")
        else:
            out[name] = TargetEntry(**base, status="missing")

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
                _problem(
                    "CKM303",
                    "missing",
                    f"missing: nothing provides {name!r} {list(entry.shape)}",
                    [name],
                    [],
                    policies["missing"],
                )
            )
    return list(out.values())


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
        consumed = next((k for k in sorted(source.meta) if _matches_source(rule, k)), None)
        if consumed is not None:  # not a typo: the keys were there, and earlier rules took them
            said += (
                f"; the source has keys it would match (such as {consumed}), but earlier rules "
                "renamed or dropped them first"
            )
        elif near := next((n for pool in pools if (n := _near_misses(rule, pool))), []):
            said += "; did you mean " + " or ".join(near) + "?"
        found.append(_problem("CKM310", "unused", said, [], [i], policies["unused"]))
    return found


def _matches_source(rule: Rule, key: str) -> bool:
    """Whether a pipeline rule would match `key` as the file names it."""
    node = rule.node
    if isinstance(node, Strip):
        return key.startswith(node.prefix)
    if node.keyword in ("init", "freeze", "unfreeze"):
        return False  # these speak of final names
    return any(m.match(key) is not None for m in (rule.matchers or (rule.matcher,)) if m)


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


def _problem(code, kind, message, keys, rules, action: str = "error") -> Problem:
    severity = "warning" if action == "warn" else "error"
    return Problem(
        code=code, kind=kind, severity=severity, message=message, keys=keys, rules=list(rules)
    )


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
