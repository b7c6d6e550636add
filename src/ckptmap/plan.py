"""The plan, as data: a Program bound to concrete key sets, from names, shapes and dtypes only.

This file is the schema (per-key records, `Plan`, its fingerprint). How a plan is
built: `pipeline.py` runs the rules over the keys, `resolve.py` meets the result
with the target and the policies.

A `Plan` says, for every source tensor, what it becomes and which rules
decided that; for every target key, where it comes from. It is plain data:
deterministic (independent of dict order), JSON-serializable, fingerprinted,
and validated (conflicts, shape mismatches, missing and unexpected keys under
the policies) before any tensor is read.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, fields
from itertools import islice
from operator import attrgetter
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel

from .errors import PlanError
from .meta import Described, TensorMeta, dtype_name, itemsize  # noqa: F401 (their old home)
from .span import Span
from .version import __version__

if TYPE_CHECKING:
    from torch import Tensor

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


# what became of a source tensor, or of a tensor the plan makes, and why (when not loaded)
Fate = Literal["loaded", "skipped", "unexpected", "failed"]
Why = Literal["skip", "init", "mismatch", "op", "merge", "split", "name", "conflict"]


@dataclass(slots=True, kw_only=True)
class SourceEntry:
    """What one source tensor becomes."""

    source: str
    value: int
    target: str  # the name it ends under (merged: the merged tensor; split: the first piece)
    shape: list[int]
    dtype: str | None = None
    status: Fate
    reason: Why | None = None
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
    status: Fate
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
    # failed: its provider did; fill: a history made it (`init ... | zeros()`)
    reason: Literal["tied", "init", "mismatch", "failed", "fill"] | None = None
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


class PlanDocument(BaseModel):
    """A plan as JSON holds it: the schema `to_json` writes and `from_json` checks."""

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


class Columns:
    """Records of one kind held as columns, one list per field (in the record's field
    order): what the planner makes in bulk. `rows` are the fingerprint's, `records` the
    objects made only when someone asks for them."""

    __slots__ = ("columns", "kind")

    def __init__(self, kind: type, columns: list[Sequence[Any]]):
        self.kind, self.columns = kind, columns

    def __len__(self) -> int:
        return len(self.columns[0])

    def rows(self) -> Iterable[tuple]:
        return zip(*self.columns, strict=True)

    def records(self) -> list:
        from .alloc import no_gc

        make = _makers.get(self.kind) or _maker(self.kind)
        columns = list(self.columns)
        with no_gc():  # a record per key, none of them garbage
            for i, f in enumerate(fields(self.kind)):
                if f.name in ("shape", "sources", "rules"):  # each record its own list
                    columns[i] = list(map(list, columns[i]))
            return list(map(make, *columns))


_makers: dict[type, Any] = {}


def _maker(kind: type) -> Any:
    """A positional constructor for a slotted record: a fifth of the keyword call's cost."""
    names = [f.name for f in fields(kind)]
    body = "".join(f"    o.{n} = {n}\n" for n in names)
    code = f"def make({', '.join(names)}):\n    o = new(kind)\n{body}    return o\n"
    scope: dict[str, Any] = {"new": object.__new__, "kind": kind}
    exec(code, scope)
    _makers[kind] = scope["make"]
    return scope["make"]


class Plan:
    """The program bound to concrete keys. Plain data: print it, diff it, save it as JSON.

    `sources` says what each source tensor becomes, `outputs` what the plan
    produces, `steps` the tensor ops between them (by value number, into
    `values`), `targets` where each target key comes from.

    The planner hands over `values`, `sources` and `outputs` as columns; the records are
    made on first use, and the fingerprint is computed from the columns when first asked.
    """

    __slots__ = (
        "_fingerprint",
        "_outputs",
        "_sealed",
        "_sources",
        "_values",
        "ckptmap",
        "policies",
        "problems",
        "rules",
        "rules_fingerprint",
        "steps",
        "targets",
        "trainable",
        "unused_rules",
    )

    def __init__(
        self,
        *,
        rules_fingerprint: str,
        rules: list[RuleInfo],
        policies: dict[str, str],
        sources: list[SourceEntry] | Columns,
        values: list[Value] | Columns | None = None,
        steps: list[Step] | None = None,
        outputs: list[OutputEntry] | Columns | None = None,
        targets: list[TargetEntry] | None = None,
        problems: list[Problem] | None = None,
        unused_rules: list[int] | None = None,
        trainable: list[Trainable] | None = None,
        fingerprint: str = "",
        ckptmap: str = __version__,
    ):
        given: dict[str, Any] = {
            "rules": rules,
            "values": [] if values is None else values,
            "sources": sources,
            "steps": [] if steps is None else steps,
            "outputs": [] if outputs is None else outputs,
            "targets": targets,
            "problems": [] if problems is None else problems,
            "trainable": [] if trainable is None else trainable,
        }
        if not all(_holds(name, held) for name, held in given.items()):  # dicts, say: checked
            document = PlanDocument.model_validate(
                {name: held for name, held in given.items() if not isinstance(held, Columns)}
                | {"rules_fingerprint": rules_fingerprint, "policies": policies}
            )
            given |= {name: getattr(document, name) for name in given if name != "sources"} | {
                "sources": sources if isinstance(sources, Columns) else document.sources
            }
        # containers of its own (a plan made from another shares none of its lists)
        own: dict[str, Any] = {
            n: h if isinstance(h, Columns) or h is None else list(h) for n, h in given.items()
        }
        self.ckptmap = ckptmap
        self.rules_fingerprint = rules_fingerprint
        self.rules = own["rules"]
        self.policies = dict(policies)
        self._values = own["values"]
        self._sources = own["sources"]
        self.steps = own["steps"]
        self._outputs = own["outputs"]
        self.targets = own["targets"]
        self.problems = own["problems"]
        self.unused_rules = [] if unused_rules is None else list(unused_rules)
        self.trainable = own["trainable"]
        self._fingerprint = fingerprint
        self._sealed: tuple | None = None

    def _seal(self) -> Plan:
        """Fix the fingerprint to the plan as it is now, to be computed when first asked:
        the planner's columns are kept (the records made from them are copies), the other
        sections are encoded now. Edits made later do not change it, as when it was
        computed at once."""
        self._sealed = (self._values, self._sources, self._outputs, _eager_sections(self))
        return self

    # --- the records, made on first use ---
    def _records(self, slot: str) -> list:
        held = getattr(self, slot)
        if isinstance(held, Columns):
            held = held.records()
            setattr(self, slot, held)
        return held

    @property
    def values(self) -> list[Value]:
        return self._records("_values")

    @values.setter
    def values(self, records: list[Value]) -> None:
        self._values = records

    @property
    def sources(self) -> list[SourceEntry]:
        return self._records("_sources")

    @sources.setter
    def sources(self, records: list[SourceEntry]) -> None:
        self._sources = records

    @property
    def outputs(self) -> list[OutputEntry]:
        return self._records("_outputs")

    @outputs.setter
    def outputs(self, records: list[OutputEntry]) -> None:
        self._outputs = records

    @property
    def fingerprint(self) -> str:
        """A hash of what the plan does (see `fingerprint_of`): of the plan as the planner
        made it, computed when first asked."""
        if self._sealed is not None:
            if not self._fingerprint:
                self._fingerprint = _digest(*self._sealed)
            self._sealed = None
        return self._fingerprint

    @fingerprint.setter
    def fingerprint(self, value: str) -> None:
        self._fingerprint, self._sealed = value, None

    def replaced(self, **changes: Any) -> Plan:
        """A copy with some fields replaced (the records are shared, not copied); its
        fingerprint is computed anew."""
        given = {name: getattr(self, name) for name in _FIELDS if name != "fingerprint"}
        return Plan(**(given | changes))

    def document(self) -> PlanDocument:
        """The plan as its JSON document (a pydantic model)."""
        return PlanDocument.model_construct(**{name: getattr(self, name) for name in _FIELDS})

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Plan):
            return NotImplemented
        return all(getattr(self, name) == getattr(other, name) for name in _FIELDS)

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return (
            f"<Plan {self.fingerprint[:19]} {len(self._sources)} sources, "
            f"{len(self._outputs)} outputs, {len(self.problems)} problems>"
        )

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
        held = self._sources
        if isinstance(held, Columns):  # source, value, target, shape, dtype, status, ...
            c = held.columns
            return {s: t for s, t, st in zip(c[0], c[2], c[5], strict=True) if st == "loaded"}
        return {e.source: e.target for e in held if e.status == "loaded"}

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
        return self.document().model_dump_json(indent=indent)

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
            document = PlanDocument.model_validate_json(text)
        except ValidationError as e:
            err = e.errors()[0]
            field = ".".join(str(p) for p in err["loc"])
            raise CheckpointError(
                f"{name}not a ckptmap plan ({field + ': ' if field else ''}{err['msg']})",
                code="CKM542",
                hint="save one with `ckptmap plan RULES -s SOURCE --json > plan.json`",
            ) from None
        plan = cls(**{name: getattr(document, name) for name in _FIELDS})
        if document.fingerprint != fingerprint_of(plan):
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


_FIELDS = tuple(PlanDocument.model_fields)


def fingerprint_of(plan: Plan) -> str:
    """A hash of what the plan does: spans and file paths do not count.

    Every field of the plan but `fingerprint`, `ckptmap` and the rules' spans is
    fed in (a new field must be added here too), as compact JSON rows: taken from the
    planner's columns when it still holds them, else from the records (the same bytes).
    """
    return _digest(plan._values, plan._sources, plan._outputs, _eager_sections(plan))


_dumps = json.JSONEncoder(separators=(",", ":"), check_circular=False).encode


def _section(rows: Any) -> bytes:
    return _dumps(rows).encode() + b"\n"


def _eager_sections(plan: Plan) -> list[bytes]:
    """The sections of the fingerprint held as records (few, or the target's): the first,
    the steps, the targets, the problems and the last."""
    return [
        _section([plan.rules_fingerprint, [r.text for r in plan.rules], plan.policies]),
        _section([[s.op, s.args, s.inputs, s.outputs, s.rule] for s in plan.steps]),
        _section(
            None
            if plan.targets is None
            else [
                [t.target, t.shape, t.dtype, t.status, t.sources, t.reason, t.tied_to, t.rules]
                for t in plan.targets
            ]
        ),
        _section([[p.code, p.kind, p.severity, p.message, p.keys, p.rules] for p in plan.problems]),
        _section([plan.unused_rules, [[t.target, t.frozen, t.rule] for t in plan.trainable]]),
    ]


def _digest(values: Any, sources: Any, outputs: Any, eager: list[bytes]) -> str:
    from .alloc import no_gc

    digest = hashlib.sha256()

    def feed_rows(held: Any, fields: str) -> None:
        """A table's rows as one JSON array, encoded a slice at a time (a million rows'
        text never held at once): the bytes `_section` would give for the whole list."""
        columns = isinstance(held, Columns)
        rows = held.rows() if columns else map(attrgetter(*fields.split()), held)
        digest.update(b"[")
        first = True
        while chunk := list(islice(rows, 4096)):
            if not first:
                digest.update(b",")
            digest.update(_encoded(chunk) if columns else _dumps(chunk)[1:-1].encode())
            first = False
        digest.update(b"]\n")

    head, steps, targets, problems, tail = eager
    with no_gc():  # rows made and dropped in bulk: nothing for the collector to find
        digest.update(head)
        feed_rows(values, "shape dtype")
        feed_rows(sources, "source value target shape dtype status reason rules")
        digest.update(steps)
        feed_rows(outputs, "target value shape dtype sources status reason rules")
        digest.update(targets + problems + tail)
    return "sha256:" + digest.hexdigest()


def _encoded(rows: list) -> bytes:
    """Rows the planner made (strings, whole numbers, None, lists of them), encoded as
    `_dumps` encodes them, without the brackets. orjson, seven times faster, gives the same
    bytes for such rows when they are all ASCII without DEL (json escapes the rest) and
    every number fits 64 bits (orjson refuses the rest); anything else goes through json."""
    if _orjson is not None:
        try:
            out = _orjson.dumps(rows)
        except TypeError:  # a number past 64 bits, a lone surrogate
            pass
        else:
            if out.isascii() and b"\x7f" not in out:
                return out[1:-1]
    return _dumps(rows)[1:-1].encode()


_orjson: Any
try:
    import orjson as _orjson
except ImportError:  # the same bytes, more slowly
    _orjson = None


_KINDS = {
    "rules": RuleInfo,
    "values": Value,
    "sources": SourceEntry,
    "steps": Step,
    "outputs": OutputEntry,
    "targets": TargetEntry,
    "problems": Problem,
    "trainable": Trainable,
}


def _holds(name: str, held: Any) -> bool:
    """Whether a field given to `Plan` is already what it holds (records of its kind)."""
    if held is None:
        return name == "targets"
    if isinstance(held, Columns):
        return held.kind is _KINDS[name]
    kind = _KINDS[name]
    return isinstance(held, list) and all(type(x) is kind for x in held)


def problem(code, kind, message, keys, rules, action: str = "error") -> Problem:
    severity: Literal["error", "warning"] = "warning" if action == "warn" else "error"
    return Problem(
        code=code, kind=kind, severity=severity, message=message, keys=keys, rules=list(rules)
    )


def jsonable(arg: Any) -> Any:
    return [jsonable(a) for a in arg] if isinstance(arg, (list, tuple)) else arg
