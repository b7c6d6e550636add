"""Planning: a Program bound to concrete key sets, from names, shapes and dtypes only.

A `Plan` says, for every source tensor, what it becomes and which rules
decided that; for every target key, where it comes from. It is plain data:
deterministic (independent of dict order), JSON-serializable, fingerprinted,
and validated (conflicts, shape mismatches, missing and unexpected keys under
the policies) before any tensor is read.
"""

from __future__ import annotations

import hashlib
import json
from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, NamedTuple

from pydantic import BaseModel

from .errors import PlanError, Span
from .version import __version__

if TYPE_CHECKING:
    from torch import Tensor

    from .compile import Program, Rule
    from .report import Report


class TensorMeta(NamedTuple):
    """What planning knows of a tensor: its shape and (when known) its dtype name."""

    shape: tuple[int, ...]
    dtype: str | None = None


@dataclass
class Described:
    """A source or target reduced to metadata: names, shapes, dtypes, ties, parameters."""

    meta: dict[str, TensorMeta]
    ties: dict[str, tuple[str, ...]] = field(default_factory=dict)  # key -> all keys sharing it
    parameters: frozenset[str] | None = None  # None: unknown (not an nn.Module)


def dtype_name(dtype: Any) -> str:
    return str(dtype).removeprefix("torch.")


def describe(obj: Any, role: str = "source") -> Described:
    """Metadata of a state_dict, `{name: shape}`, nn.Module or checkpoint path (no tensor data)."""
    import torch

    from .io import Checkpoint

    if isinstance(obj, Described):
        return obj
    if isinstance(obj, Checkpoint):
        return obj.describe()
    if isinstance(obj, torch.nn.Module):
        state = obj.state_dict(keep_vars=True)  # the live tensors: nothing is copied
        params = frozenset(n for n, _ in obj.named_parameters(remove_duplicate=False))
        return Described(_meta_of(state, role), _ties(state), params)
    if isinstance(obj, (str, Path)):
        from .io import open_checkpoint

        return open_checkpoint(obj).describe()
    if isinstance(obj, Mapping):
        tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
        return Described(_meta_of(obj, role), _ties(tensors))
    raise TypeError(
        f"{role} must be a state_dict, a {{name: shape}} mapping, an nn.Module or a checkpoint "
        f"path, not {type(obj).__name__}"
    )


def _meta_of(mapping: Mapping[str, Any], role: str) -> dict[str, TensorMeta]:
    import torch

    out: dict[str, TensorMeta] = {}
    for key, value in mapping.items():
        if not isinstance(key, str):
            raise TypeError(f"{role} keys must be strings, got {key!r}")
        if isinstance(value, torch.Tensor):
            out[key] = TensorMeta(tuple(value.shape), dtype_name(value.dtype))
        elif isinstance(value, TensorMeta):
            out[key] = value
        elif isinstance(value, (tuple, list, torch.Size)) and all(
            isinstance(d, int) and d >= 0 for d in value
        ):
            out[key] = TensorMeta(tuple(value))
        else:
            raise TypeError(
                f"{role} entry {key!r} is a {type(value).__name__}, not a tensor or a shape"
            )
    return out


def _ties(tensors: Mapping[str, Any]) -> dict[str, tuple[str, ...]]:
    """Keys whose tensors share storage (tied embeddings), grouped."""
    groups: dict[Any, list[str]] = defaultdict(list)
    for key, t in tensors.items():
        if t.device.type == "meta" or t.numel() == 0:
            ident: Any = ("object", id(t))
        else:
            ident = (
                t.untyped_storage().data_ptr(),
                t.storage_offset(),
                tuple(t.shape),
                tuple(t.stride()),
                t.dtype,
            )
        groups[ident].append(key)
    return {k: tuple(sorted(g)) for g in groups.values() if len(g) > 1 for k in g}


# --- the plan, as data ---------------------------------------------------------------------


class RuleInfo(BaseModel):
    """A rule of the program, as the plan and report name it."""

    id: int
    text: str
    span: Span | None = None

    def __str__(self) -> str:
        return f"{self.text} ({self.span})" if self.span else self.text


class SourceEntry(BaseModel):
    """What one source tensor becomes."""

    source: str
    target: str  # the final name after the pipeline (even when skipped)
    shape: list[int]
    dtype: str | None = None
    status: Literal["loaded", "skipped", "unexpected"]
    reason: Literal["skip", "init", "mismatch"] | None = None
    rules: list[int] = []  # the rules that matched this key, in order


class TargetEntry(BaseModel):
    """Where one target key comes from."""

    target: str
    shape: list[int]
    dtype: str | None = None
    status: Literal["loaded", "initialized", "missing"]
    source: str | None = None
    reason: Literal["tied", "init", "mismatch"] | None = None
    tied_to: str | None = None
    rules: list[int] = []


class Problem(BaseModel):
    """Something the policies do not allow (error) or want said (warning)."""

    code: str
    kind: Literal["conflict", "mismatch", "missing", "unexpected", "name"]
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
    """The program bound to concrete keys. Plain data: print it, diff it, save it as JSON."""

    ckptmap: str = __version__
    rules_fingerprint: str
    rules: list[RuleInfo]
    policies: dict[str, str]
    sources: list[SourceEntry]
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
        """Source key -> target key, for the tensors that are loaded."""
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
        return self.model_dump_json(indent=indent)

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


def fingerprint_of(plan: Plan) -> str:
    """A hash of what the plan does: spans and file paths do not count."""
    data = plan.model_dump(mode="json", exclude={"fingerprint", "ckptmap"})
    for rule in data["rules"]:
        rule.pop("span", None)
    blob = json.dumps(data, sort_keys=True, separators=(",", ":")).encode()
    return "sha256:" + hashlib.sha256(blob).hexdigest()


# --- building it ---------------------------------------------------------------------------


def build_plan(
    program: Program, source: Described, target: Described | None, policies: dict[str, str]
) -> Plan:
    from .compile import SKIP

    used: set[int] = set()
    problems: list[Problem] = []
    entries: list[SourceEntry] = []

    # 1. the pipeline, top to bottom, for each source key (sorted: order never matters)
    for key in sorted(source.meta):
        meta = source.meta[key]
        name, trace, status, reason = key, [], "loaded", None
        for rule in program.steps:
            out = rule.step(name)
            if out is None:
                continue
            used.add(rule.id)
            trace.append(rule.id)
            if out is SKIP:
                status, reason = "skipped", "skip"
                break
            name = out
        if status == "loaded" and (not name or "" in name.split(".")):
            problems.append(
                _problem(
                    "CKM305", "name", f"{key!r} became {name!r}, not a valid key", [key], trace
                )
            )
        if status == "loaded":
            init = _first_match(program.inits, name)
            if init is not None:
                used.add(init.id)
                trace.append(init.id)
                status, reason = "skipped", "init"
        entries.append(
            SourceEntry(
                source=key,
                target=name,
                shape=list(meta.shape),
                dtype=meta.dtype,
                status=status,
                reason=reason,
                rules=trace,
            )
        )

    # 2. two sources on one name: never silent
    landing: dict[str, list[SourceEntry]] = defaultdict(list)
    for e in entries:
        if e.status == "loaded":
            landing[e.target].append(e)
    for name, group in sorted(landing.items()):
        if len(group) > 1:
            via = "; ".join(f"{e.source} via {_rules_text(program, e.rules)}" for e in group)
            problems.append(
                _problem(
                    "CKM301",
                    "conflict",
                    f"{len(group)} sources map to {name!r}: {via}",
                    [e.source for e in group],
                    sorted({r for e in group for r in e.rules}),
                )
            )

    # 3. against the target: shapes, unexpected, then every target key
    targets = None
    if target is not None:
        targets = _match_target(program, entries, landing, target, policies, used, problems)

    # 4. freeze / unfreeze: the last matching rule wins
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

    # rules that decide nothing are still "used" when they match a target key
    unused = [
        r.id
        for r in program.rules
        if r.id not in used
        and r.node.keyword not in ("on", "include")
        and not (r.node.keyword == "init" and target is not None and _any_match(r, target.meta))
    ]
    plan = Plan(
        rules_fingerprint=program.fingerprint,
        rules=[RuleInfo(id=r.id, text=r.text, span=r.span) for r in program.rules],
        policies=dict(sorted(policies.items())),
        sources=entries,
        targets=targets,
        problems=problems,
        unused_rules=unused,
        trainable=trainable,
    )
    plan.fingerprint = fingerprint_of(plan)
    return plan


def _match_target(
    program: Program,
    entries: list[SourceEntry],
    landing: dict[str, list[SourceEntry]],
    target: Described,
    policies: dict[str, str],
    used: set[int],
    problems: list[Problem],
) -> list[TargetEntry]:
    mismatched: dict[str, SourceEntry] = {}
    for e in entries:
        if e.status != "loaded":
            continue
        want = target.meta.get(e.target)
        if want is None:
            e.status = "unexpected"
            if policies["unexpected"] != "ignore":
                problems.append(
                    _problem(
                        "CKM304",
                        "unexpected",
                        f"{e.source!r} maps to {e.target!r}, which the target does not have",
                        [e.source],
                        e.rules,
                        policies["unexpected"],
                    )
                )
        elif tuple(e.shape) != want.shape:
            e.status, e.reason = "skipped", "mismatch"
            mismatched[e.target] = e
            if policies["mismatch"] == "error":
                problems.append(
                    _problem(
                        "CKM302",
                        "mismatch",
                        f"shape mismatch: {e.source} {list(e.shape)} -> {e.target} expects "
                        f"{list(want.shape)}",
                        [e.source, e.target],
                        e.rules,
                    )
                )

    out: dict[str, TargetEntry] = {}
    for name in sorted(target.meta):
        meta = target.meta[name]
        base = {"target": name, "shape": list(meta.shape), "dtype": meta.dtype}
        providers = [e for e in landing.get(name, ()) if e.status == "loaded"]
        if providers:
            out[name] = TargetEntry(
                **base, status="loaded", source=providers[0].source, rules=providers[0].rules
            )
        elif name in mismatched:
            e = mismatched[name]
            out[name] = TargetEntry(
                **base, status="initialized", source=e.source, reason="mismatch", rules=e.rules
            )
        elif (init := _first_match(program.inits, name)) is not None:
            used.add(init.id)
            out[name] = TargetEntry(**base, status="initialized", reason="init", rules=[init.id])
        else:
            out[name] = TargetEntry(**base, status="missing")

    # a key that shares storage with a loaded key is loaded too (tied embeddings)
    for name, entry in out.items():
        if entry.status != "missing":
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
