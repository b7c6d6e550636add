"""The pipeline: source keys through the rules, statement by statement, as value graphs.

Keys that differ only in their numbers share a template (a bucket): a rule is tried once
per bucket, and a digit-free strip/prefix/rename/skip renames a whole bucket from one
match. Ops are inferred on shapes (never run); a problem is recorded, never raised.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, fields
from itertools import repeat
from operator import getitem, itemgetter, le
from typing import TYPE_CHECKING, Any

from .meta import Described
from .ops import Meta, Op, OpError
from .patterns import SKIP, digit_template
from .plan import Problem, Step, Why, jsonable, problem
from .rules import arg_text

if TYPE_CHECKING:
    from .compile import Program
    from .statements import Rule


@dataclass(slots=True)
class _Node:
    """A tensor alive in the pipeline: its current name, value, the sources it is made of."""

    name: str
    value: int
    sources: tuple[str, ...]
    rules: list[int]
    order: tuple[int, ...] = ()  # where it stands in the output: source index, then piece
    template: str | None = None  # its name with every digit as '#': its bucket
    failed: Why | None = None  # the kind of problem that stopped it (op, merge, split)


@dataclass(slots=True, eq=False)
class _Group:
    """Tensors of one bucket with one history (the same rules, no problem), as columns:
    what whole-bucket renames move at once. A rule that looks at keys one by one turns
    the group into its nodes first, in place (`Builder._explode`)."""

    template: str | None
    names: list[str]
    values: list[int]
    sources: list[tuple[str, ...]]
    orders: list[tuple[int, ...]]
    rules: list[int]  # shared by every member
    failed: Why | None = None

    def nodes(self) -> list[_Node]:
        rules, template = self.rules, self.template
        return [
            _Node(name, value, sources, list(rules), order, template)
            for name, value, sources, order in zip(
                self.names, self.values, self.sources, self.orders, strict=True
            )
        ]


@dataclass(slots=True, eq=False)
class Live:
    """What the pipeline left, one list per field, in output order."""

    names: list[str]
    values: list[int]
    sources: list[tuple[str, ...]]
    orders: list[tuple[int, ...]]
    rules: list[list[int]]
    failed: list[Why | None]
    templates: list[str]


def _cook(parts: list, keys: list[str]) -> list[str]:
    """The keys rewritten by a recipe, part by part over all of them (one join per key):
    each slice is taken from every key in one `map`."""
    columns = [
        repeat(p, len(keys)) if isinstance(p, str) else map(getitem, keys, repeat(slice(*p)))
        for p in parts
    ]
    return list(map("".join, zip(*columns, strict=True))) if columns else [""] * len(keys)


def _templates(keys: list[str]) -> list[str]:
    """Every key's template, in one translation of all of them joined (a name with a line
    break in it, which no checkpoint has, goes key by key)."""
    joined = "\n".join(keys)
    if not keys or joined.count("\n") != len(keys) - 1:
        return list(map(digit_template, keys))
    return digit_template(joined).split("\n")


class Builder:
    """Runs the pipeline statement by statement over every key (merges need whole groups).

    Values are columns (`shapes`, `dtypes`): source `i` (in sorted order) is value `i`.
    """

    def __init__(self, program: Program, source: Described, columns: bool = True):
        self.program = program
        self.steps: list[Step] = []
        self.problems: list[Problem] = []
        self.used: set[int] = set()
        self.dropped: list[_Node | _Group] = []  # skipped by a `skip` rule
        self._made_by: tuple[list, dict[int, Step]] | None = None
        self.failed_names: set[str] = set()  # names a failed merge or split would have made
        self.buckets: dict[str, list[_Node | _Group]] = {}
        meta = source.meta
        self.keys = keys = sorted(meta)
        metas = list(map(meta.__getitem__, keys))
        self.shapes: list[Any] = list(map(itemgetter(0), metas))
        self.dtypes: list[str | None] = list(map(itemgetter(1), metas))
        # value i is source i: one int object each, shared by the columns that hold it
        self.source_ids = ids = list(range(len(keys)))
        by_template: dict[str, list[int]] = defaultdict(list)
        for index, template in zip(ids, _templates(keys), strict=True):
            by_template[template].append(index)
        for template, indexes in by_template.items():
            names = list(map(keys.__getitem__, indexes))
            # zip of one column: its items as 1-tuples (each key's sources, its order)
            group = _Group(template, names, indexes, list(zip(names)), list(zip(indexes)), [])
            self.buckets[template] = [group]
            if not columns:  # key by key from the start: the shortcut's reference
                self._explode(template)

    def _explode(self, template: str) -> list[_Node | _Group]:
        """The bucket's groups as nodes, in place and in order."""
        items = self.buckets[template]
        if any(type(i) is _Group for i in items):
            items[:] = [n for i in items for n in (i.nodes() if type(i) is _Group else (i,))]
        return items

    def _add(self, node: _Node) -> None:
        node.template = digit_template(node.name)
        self.buckets.setdefault(node.template, []).append(node)

    def _candidates(self, rule: Rule) -> list[_Node]:
        test = rule.bucket_test()
        out: list[Any] = []
        for template in list(self.buckets):
            if test is None or test(template):
                out.extend(self._explode(template))
        return out

    def _settle(
        self, changed: list[_Node], gone: Sequence[_Node] = (), new: Sequence[_Node] = ()
    ) -> None:
        """Move renamed nodes to their templates' buckets; drop gone ones; add new ones."""
        touched: set[Any] = set()  # templates; a node's is None only once it has gone
        for n in changed:
            template = digit_template(n.name)
            if template != n.template:
                touched.add(n.template)
                n.template = template
                self.buckets.setdefault(template, []).append(n)
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

    def live(self) -> Live:
        """Every tensor the pipeline left, in output order, as columns."""
        out = Live([], [], [], [], [], [], [])
        for items in self.buckets.values():
            for i in items:
                if type(i) is _Group:
                    k = len(i.names)
                    out.names += i.names
                    out.values += i.values
                    out.sources += i.sources
                    out.orders += i.orders
                    out.rules += [i.rules] * k
                    out.failed += [i.failed] * k
                    out.templates += [i.template] * k  # type: ignore[list-item]
                else:
                    n: Any = i
                    out.names.append(n.name)
                    out.values.append(n.value)
                    out.sources.append(n.sources)
                    out.orders.append(n.order)
                    out.rules.append(n.rules)
                    out.failed.append(n.failed)
                    out.templates.append(n.template)
        orders = out.orders
        if all(map(le, orders, orders[1:])):  # in order already
            return out
        if set(map(len, orders)) == {1}:  # each a source's own: sort on its number
            firsts = list(map(itemgetter(0), orders))
            perm = sorted(range(len(orders)), key=firsts.__getitem__)
        else:
            perm = sorted(range(len(orders)), key=orders.__getitem__)
        take = itemgetter(*perm) if len(perm) > 1 else None
        for f in fields(Live):
            column = getattr(out, f.name)
            setattr(out, f.name, list(take(column)) if take else column)
        return out

    def _value(self, shape: Any, dtype: str | None) -> int:
        self.shapes.append(tuple(shape))
        self.dtypes.append(dtype)
        return len(self.shapes) - 1

    def meta(self, value: int) -> Meta:
        return Meta(tuple(self.shapes[value]), self.dtypes[value])

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
                problem(
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
                args=[jsonable(a) for a in op.args],
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
            )
        _, made_by = self._made_by
        keys = self.keys

        def text(v: int) -> str:
            step = made_by.get(v)
            if step is None:
                return f"{keys[v] if v < len(keys) else '?'} {list(self.shapes[v])}"
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

    def run(self) -> Live:
        for rule in self.program.steps:
            rule.plan(self)  # each kind knows whether it renames, transforms, merges, splits
        return self.live()

    def rename(self, rule: Rule) -> None:
        if rule.whole_buckets():
            self._rename_buckets(rule)
            return
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
        moves: list[tuple[str, str | None, list[_Node | _Group]]] = []
        for template, items in list(self.buckets.items()):
            recipe = rule.recipe(template)
            if recipe is None:
                continue
            self.used.add(rule.id)
            for i in items:
                i.rules.append(rule.id)  # a group's list is its members' one list
            if recipe is SKIP:
                self.dropped.extend(items)
                moves.append((template, None, items))
                continue
            for i in items:
                if type(i) is _Group:
                    i.names = _cook(recipe, i.names)
                else:
                    n: Any = i
                    n.name = _cook(recipe, [n.name])[0]
            moves.append((template, digit_template(_cook(recipe, [template])[0]), items))
        for template, _, _ in moves:
            del self.buckets[template]
        for _, new, items in moves:
            if new is None:
                continue
            for i in items:
                i.template = new
            self.buckets.setdefault(new, []).extend(items)

    def transform(self, rule: Rule) -> None:
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

    def merge(self, rule: Rule) -> None:
        template = rule.template
        outer = sorted({name for name, _ in template.refs})  # type: ignore[union-attr]
        groups, captures = self._merge_groups(rule, outer)
        if groups:
            self.used.add(rule.id)
        merged: dict[int, _Node] = {}  # id(first member) -> the merged node
        gone: set[int] = set()
        for key, group in groups.items():
            name = template.render(captures[key])  # type: ignore[union-attr]
            where = ", ".join(f"{{{c}}}={v}" for c, v in zip(outer, key, strict=True))
            members = self._merge_members(rule, group, where)
            if members is None:
                self.failed_names.add(name)
                continue
            names = [m.name for m in members]
            out = self._run(rule.ops[0], rule, [m.value for m in members], names)
            value = self._chain(rule.ops[1:], rule, out[0], name) if out else None
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

    def _merge_groups(self, rule: Rule, outer: list[str]) -> tuple[dict, dict]:
        """The keys a merge takes, grouped by the captures its target uses, each in its place
        (a pattern's index, or the gathered capture's value); two keys in one place are a
        problem."""
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
                        problem(
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
        return groups, captures

    def _merge_members(self, rule: Rule, group: dict, where: str) -> list[_Node] | None:
        """A group's members in merge order, or None (a problem said) when one is missing or
        the gathered numbers do not run 0..n-1."""
        if rule.gather:
            order = sorted(group, key=lambda s: (not s.isdigit(), int(s) if s.isdigit() else s))
            if order == [str(i) for i in range(len(order))]:
                return [group[s] for s in order]
            said = (
                f"{rule.where()}: {{{rule.gather}}} must run 0..{len(order) - 1} "
                f"{'for ' + where if where else ''}, found {', '.join(order)}"
            )
            keys = [group[s].name for s in order]
        else:
            missing = [rule.node.patterns[k] for k in range(len(rule.matchers)) if k not in group]  # type: ignore[attr-defined]
            if not missing:
                return [group[k] for k in range(len(rule.matchers))]
            said = (
                f"{rule.where()}{' for ' + where if where else ''}: nothing matches "
                f"{', '.join(p.to_text() for p in missing)} "
                f"(present: {', '.join(group[k].name for k in sorted(group))})"
            )
            keys = [group[k].name for k in sorted(group)]
        _fail(group.values(), "merge", rule)
        self.problems.append(problem("CKM307", "merge", said, keys, [rule.id]))
        return None

    def split(self, rule: Rule) -> None:
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
                    problem(
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
                    problem(
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
