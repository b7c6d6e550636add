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
from dataclasses import dataclass, field
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


def problem(code, kind, message, keys, rules, action: str = "error") -> Problem:
    severity: Literal["error", "warning"] = "warning" if action == "warn" else "error"
    return Problem(
        code=code, kind=kind, severity=severity, message=message, keys=keys, rules=list(rules)
    )


def jsonable(arg: Any) -> Any:
    return [jsonable(a) for a in arg] if isinstance(arg, (list, tuple)) else arg
