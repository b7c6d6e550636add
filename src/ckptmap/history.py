"""Revision histories: a folder of rule files, each one step between two revisions of a
model, like Alembic's migrations for database schemas.

    migrations/
      0001-base.ckmap            revision "0001-base"
      0001-base.schema.json      the base's schema (names, shapes, dtypes)
      0002-rename.ckmap          revision "0002-rename" from "0001-base"
      0003-add-layer.ckmap       revision "0003-add-layer" from "0002-rename"
      0003-add-layer.schema.json a step that adds tensors keeps its schema too

Every revision has a schema: its snapshot (`ID.schema.json` beside the step file) or,
for a step that adds nothing, the parent's schema planned forward through the step.
Each step is planned in its own scope, from its parent's tensors to its own schema; a
chain of steps is composed into one Plan (chain.py), so upgrading through three steps
reads and writes the bytes once. A checkpoint's revision is its stamp (written into
every file a history writes) or, unstamped, the revision whose schema it matches.
"""

from __future__ import annotations

import hashlib
import itertools
import json
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from .apply import LOADING, apply_plan, opened, tensors_of, write_plan
from .chain import Hop, compose, introduced, next_source, refuse_problems
from .compile import Program, compile
from .errors import CkptmapError, HistoryError, PlanError, UsageError, needs_torch, summarize
from .io import Checkpoint, describe
from .io.write import provenance, write_text_atomically
from .limits import check_text_size
from .meta import DTYPES, TensorMeta, meta_of
from .plan import OutputEntry, SourceEntry, TargetEntry, Value
from .report import collapse_keys
from .rules import Init, OpCall, Revision
from .suggest import suggest

if TYPE_CHECKING:
    import torch

    from .plan import Plan
    from .report import Report

RULE_SUFFIXES = (".ckmap", ".yaml", ".yml", ".json")
SCHEMA_SUFFIX = ".schema.json"
SCHEMA_FORMAT = 1
# the metadata keys of a file written under a history
STAMP_REVISION = "ckptmap.revision"
STAMP_HISTORY = "ckptmap.history"
STAMP_CHAIN = "ckptmap.chain"


@dataclass
class Step:
    """One file of a history: a revision, its parents, its rules."""

    id: str
    parents: tuple[str, ...]
    file: Path
    program: Program

    @property
    def schema_file(self) -> Path:
        return self.file.with_name(_stem(self.file) + SCHEMA_SUFFIX)

    @property
    def adds_tensors(self) -> bool:
        return bool(self.program.inits)


@dataclass
class Identified:
    """Which revision a checkpoint is at, and how that was decided."""

    revision: str | None
    how: Literal["stamp", "schema", "nearest", "given"]
    # the revisions nearest to an unknown checkpoint, each with what differs
    nearest: list[tuple[str, list[str]]] = field(default_factory=list)
    note: str = ""
    alike: list[str] = field(default_factory=list)  # revisions whose schemas it matches alike

    def __str__(self) -> str:
        if self.revision is None and not self.nearest:
            return self.note or "at no revision of this history"
        if self.revision is not None:
            how = {
                "stamp": "from the revision stamped in its metadata",
                "schema": "its names, shapes and dtypes are that revision's schema",
                "given": "as given",
                "nearest": "",
            }[self.how]
            return f"{self.revision} ({how})" + (f"; {self.note}" if self.note else "")
        lines = ["no revision's schema matches exactly; nearest:"]
        for rev, diff in self.nearest:
            lines.append(f"  {rev}: " + "; ".join(diff))
        return "\n".join(lines)


class History:
    """A folder of revision steps: its graph, schemas, and the way between revisions.

    history = ckptmap.History("migrations")
    history.current("old.safetensors")            # which revision, and how it was told
    sd, report = history.upgrade("old.safetensors")  # to head, one pass
    sd, report = history.downgrade(sd, to="0002-rename")
    """

    def __init__(self, path: str | Path):
        if not isinstance(path, (str, Path)):
            raise UsageError(f"History takes a folder path, not {type(path).__name__}")
        self.path = Path(path)
        if not self.path.is_dir():
            raise HistoryError(f"{self.path}: not a folder of revision steps", code="CKM601")
        self.steps: dict[str, Step] = _read_steps(self.path)
        self.children: dict[str, list[str]] = {rev: [] for rev in self.steps}
        for step in self.steps.values():
            for p in step.parents:
                self.children[p].append(step.id)
        self.order = _topological(self.steps)
        self.base = self.order[0]
        self.heads = sorted(r for r, kids in self.children.items() if not kids)
        if len(self.heads) > 1:
            raise HistoryError(
                f"{self.path}: {len(self.heads)} heads ({', '.join(self.heads)}): a history has "
                "one, unless a merge joins them",
                code="CKM602",
                hint=f'a merge step: revision "merge" from {", ".join(map(repr, self.heads))}',
            )
        self.head = self.heads[0]
        self._schemas: dict[str, dict[str, TensorMeta]] = {}
        self._derived: dict[str, Plan] = {}  # the plans that made schemas, from the parent's

    def __repr__(self) -> str:
        return f"<History {self.path} {len(self.steps)} revisions, head {self.head}>"

    # --- the graph ---
    def parents(self, revision: str) -> tuple[str, ...]:
        return self._step(revision).parents

    def path_between(self, start: str, end: str) -> list[str]:
        """The revisions an upgrade from `start` to `end` passes, `end` last (`start` not
        included); the shortest way, ties broken by id. HistoryError when there is none."""
        start, end = self.resolve(start), self.resolve(end)
        came_from: dict[str, str | None] = {start: None}
        queue = deque([start])
        while queue:
            rev = queue.popleft()
            if rev == end:
                break
            for child in sorted(self.children[rev]):
                if child not in came_from:
                    came_from[child] = rev
                    queue.append(child)
        if end not in came_from:
            raise HistoryError(
                f"no upgrade from {start} to {end}: {end} is not a descendant of {start}",
                code="CKM607",
                hint="downgrade goes the other way" if end in self._ancestors(start) else None,
            )
        path = []
        at: str | None = end
        while at is not None and at != start:
            path.append(at)
            at = came_from[at]
        return path[::-1]

    def _ancestors(self, revision: str) -> set[str]:
        seen: set[str] = set()
        stack = list(self.parents(revision))
        while stack:
            r = stack.pop()
            if r not in seen:
                seen.add(r)
                stack.extend(self.parents(r))
        return seen

    def _step(self, revision: str) -> Step:
        if not isinstance(revision, str):
            raise UsageError(
                f"a revision is named by its id (a str), not {type(revision).__name__}"
            )
        if revision == "head":
            revision = self.head
        elif revision == "base":
            revision = self.base
        if revision not in self.steps:
            import difflib

            close = difflib.get_close_matches(revision, list(self.steps), n=1)
            raise HistoryError(
                f"{self.path}: no revision {revision!r}",
                code="CKM607",
                hint=f"did you mean {close[0]!r}?"
                if close
                else f"revisions: {', '.join(self.order)}",
            )
        return self.steps[revision]

    def resolve(self, revision: str) -> str:
        """A revision id; `head` and `base` name those."""
        return self._step(revision).id

    # --- schemas and fingerprints ---
    def schema(self, revision: str) -> dict[str, TensorMeta]:
        """The revision's names, shapes and dtypes: its snapshot, or its parent's schema
        planned forward through the step (a step that adds tensors needs a snapshot)."""
        step = self._step(revision)
        if step.id in self._schemas:
            return self._schemas[step.id]
        if step.schema_file.exists():
            schema = read_schema(step.schema_file)
        elif not step.parents:
            raise HistoryError(
                f"{step.file}: the base revision {step.id} has no schema ({step.schema_file.name})",
                code="CKM604",
                hint=f"ckptmap revision {self.path} -m MESSAGE --base CHECKPOINT|pkg.mod:factory "
                "starts a history with one",
            )
        elif step.adds_tensors:
            raise HistoryError(
                f"{step.file}: {step.id} adds tensors (init) but has no schema "
                f"({step.schema_file.name}) to say their shapes",
                code="CKM604",
                hint=f"put {step.schema_file.name} beside it (`ckptmap revision FOLDER -m MESSAGE "
                "--target MODEL` writes one with a new step)",
            )
        else:
            plan = step.program.plan(self.schema(step.parents[0]), on_unused="ignore")
            refuse_problems(
                plan, f"{step.file}: planning {step.id}'s schema from {step.parents[0]}"
            )
            schema = next_source(plan)
            self._derived[step.id] = plan
        self._schemas[step.id] = schema
        return schema

    def fingerprint(self, revision: str) -> str:
        """A hash of the steps that lead to `revision` (ids, parents, rules): two histories
        that agree up to a revision have the same fingerprint there."""
        step = self._step(revision)
        lines = []
        for rev in sorted({step.id} | self._ancestors(step.id)):
            s = self.steps[rev]
            snapshot = ""
            if s.schema_file.exists():  # what a fill makes depends on the schema's dtypes
                snapshot = hashlib.sha256(s.schema_file.read_bytes()).hexdigest()
            lines.append(f"{rev} {' '.join(s.parents)} {s.program.fingerprint} {snapshot}")
        return "sha256:" + hashlib.sha256("\n".join(lines).encode()).hexdigest()

    # --- which revision a checkpoint is at ---
    def current(self, source: Any) -> Identified:
        """The revision `source` (a checkpoint path, a state_dict, {name: shape}) is at:
        its stamp when it has one, else the revision whose schema it matches exactly, else
        (revision None) the nearest revisions with what differs."""
        source = opened(source)
        stamp = source.metadata.get(STAMP_REVISION) if isinstance(source, Checkpoint) else None
        if stamp is not None:
            if stamp not in self.steps:
                return Identified(
                    None, "stamp", note=f"stamped {stamp!r}, a revision this history does not have"
                )
            wrong = schema_difference(_meta(source), self.schema(stamp), dtypes=False)
            if wrong:  # a stamp is a claim: the tensors must bear it out
                return Identified(
                    None,
                    "stamp",
                    note=f"stamped {stamp}, but its tensors are not {stamp}'s: " + "; ".join(wrong),
                )
            said = source.metadata.get(STAMP_HISTORY)
            note = ""
            if said and said != self.fingerprint(stamp):
                note = "the history's steps up to it have changed since the file was written"
            return Identified(stamp, "stamp", note=note)
        meta = _meta(source)
        exact, shaped, scored = [], [], []
        for rev in self.order:
            try:
                schema = self.schema(rev)
            except HistoryError:
                continue  # a revision without a schema matches nothing
            diff = schema_difference(meta, schema)
            if not diff:
                exact.append(rev)
            elif not schema_difference(meta, schema, dtypes=False):
                shaped.append((rev, diff))
            scored.append((len(diff), rev, diff))
        for found, note in ((exact, ""), ([r for r, _ in shaped], "")):
            if len(found) == 1:
                if found is not exact:  # a copy in other dtypes (bf16) is at the revision too
                    note = "its dtypes are not the schema's: " + "; ".join(shaped[0][1])
                return Identified(found[0], "schema", note=note)
            if found:
                return Identified(
                    None,
                    "schema",
                    note=f"it matches {', '.join(found)}, whose schemas are the same: say "
                    "which (--from)",
                    alike=list(found),
                )
        scored.sort(key=lambda t: (t[0], self.order.index(t[1])))
        return Identified(None, "nearest", nearest=[(r, d) for _, r, d in scored[:3]])

    def _at(self, source: Any, given: str | None) -> str:
        if given is not None:
            return self.resolve(given)
        found = self.current(source)
        if found.revision is None:
            raise HistoryError(
                "the checkpoint is at no revision of this history: " + str(found).split("\n")[0],
                code="CKM605",
                details=str(found).split("\n")[1:],
                hint="say which with from_= / --from REV when it is known",
            )
        return found.revision

    # --- planning between revisions ---
    def plan(
        self, source: Any, to: str = "head", *, from_: str | None = None, model: Any = None
    ) -> Plan:
        """One plan from `source` (at its revision, or `from_`) up to `to`: each step
        planned in its own scope, composed. `model` (an nn.Module at `to`) is what the
        last step is checked against, when given."""
        return compose(self._upgrade_hops(source, to, from_, model))

    def _upgrade_hops(self, source: Any, to: str, from_: str | None, model: Any) -> list[Hop]:
        start = self._at(source, from_)
        end = self.resolve(to)
        if start == end:
            raise HistoryError(f"the checkpoint is already at {end}", code="CKM607")
        if end in self._ancestors(start):
            raise HistoryError(
                f"the checkpoint is at {start}, newer than {end}: upgrade goes forward only",
                code="CKM605",
                hint=f"downgrade it: history.downgrade(source, to={end!r}) / ckptmap downgrade",
            )
        if model is not None:
            at = self.revision_of(model)
            if at is not None and at != end:
                raise HistoryError(
                    f"the model is at revision {at} (its schema), not {end}",
                    code="CKM605",
                    hint=f"upgrade --to {at}, or give the model of {end}",
                )
        path = self.path_between(start, end)
        return self._hops(opened(source), [start, *path], model)

    def revision_of(self, model: Any) -> str | None:
        """The revision whose schema an nn.Module (or a state_dict) has, or None."""
        meta = _meta(model)
        for rev in reversed(self.order):
            try:
                if not schema_difference(meta, self.schema(rev)):
                    return rev
            except HistoryError:
                continue
        return None

    def plan_into(self, model: Any, source: Any, *, from_: str | None = None) -> Plan:
        """The plan that loads `source` into `model`: up the steps to the model's revision
        (head when no revision's schema is the model's), checked against the model."""
        end = self.revision_of(model) or self.head
        start = self._at(source, from_)
        if start == end:  # already there: loaded as it is, strictly
            return compile("").plan(source, model)
        return self.plan(source, end, from_=start, model=model)

    def _hops(self, source: Any, revisions: list[str], model: Any = None) -> list[Hop]:
        """Each step planned in its own scope, on what the step before it leaves."""
        hops: list[Hop] = []
        here: Any = source
        for parent, rev in itertools.pairwise(revisions):
            step = self.steps[rev]
            target: Any = self.schema(rev)
            if model is not None and rev == revisions[-1]:
                target = model
            # a merge is planned from one of its parents: its other parents' rules may go
            # unused here (check() has seen each used from some parent)
            unused = "ignore" if len(step.parents) > 1 else None
            # a middle hop from the parent's very schema is the plan that derived this one's
            # (the last hop is planned against its target: the report says what it meets)
            plan = self._derivation(step, parent, here, target) if rev != revisions[-1] else None
            if plan is None:
                plan = step.program.plan(here, target, on_unused=unused)
            if target is model and model is not None:
                plan.check()  # the model's own mismatch: a plan problem (exit 1), as in apply
            refuse_problems(plan, f"{step.file}: {parent} -> {rev}")
            hops.append(Hop(plan, _fills(step.program, plan)))
            here = next_source(plan)
        return hops

    def _derivation(self, step: Step, parent: str, here: Any, target: Any) -> Plan | None:
        """The plan that derived this step's schema, when this hop is that same planning:
        from the parent's schema exactly, to the schema it made, every rule used."""
        plan = self._derived.get(step.id)
        if plan is None or step.parents[0] != parent or not isinstance(here, dict):
            return None
        if target is not self._schemas[step.id] or here != self.schema(parent):
            return None
        optional = {r.id for r in step.program.rules if r.node.optional or r.role == "revision"}
        return None if set(plan.unused_rules) - optional else plan

    def downgrade_plan(
        self, source: Any, to: str, *, from_: str | None = None, allow_lossy: bool = False
    ) -> Plan:
        """The exact inverse of the upgrade from `to` to the source's revision."""
        start = self._at(source, from_)
        end = self.resolve(to)
        if start == end:
            raise HistoryError(f"the checkpoint is already at {end}", code="CKM607")
        if end not in self._ancestors(start):
            raise HistoryError(
                f"the checkpoint is at {start}; {end} is not older: downgrade goes back only",
                code="CKM605" if start in self._ancestors(end) else "CKM607",
                hint="upgrade goes forward" if start in self._ancestors(end) else None,
            )
        forward = compose(self._hops(self.schema(end), [end, *self.path_between(end, start)]))
        return forward.inverse(allow_lossy=allow_lossy)

    # --- running it ---
    def upgrade(
        self, source: Any, to: str = "head", *, from_: str | None = None
    ) -> tuple[dict[str, torch.Tensor], Report]:
        """`(state_dict, report)` at `to`, in memory: one pass over the source's tensors."""
        plan = self.plan(source, to, from_=from_)
        return _run(plan, source)

    def downgrade(
        self, source: Any, to: str, *, from_: str | None = None, allow_lossy: bool = False
    ) -> tuple[dict[str, torch.Tensor], Report]:
        """`(state_dict, report)` at the older revision `to`: the composed upgrade
        inverted, exactly; a step that loses data refuses (CKM308) unless `allow_lossy`."""
        plan = self.downgrade_plan(source, to, from_=from_, allow_lossy=allow_lossy)
        return _run(plan, _only_planned(plan, source, allow_lossy))

    def write(
        self,
        source: Any,
        out: str | Path,
        to: str = "head",
        *,
        downgrade: bool = False,
        from_: str | None = None,
        model: Any = None,
        allow_lossy: bool = False,
        max_shard_size: int | None = None,
        overwrite: bool = False,
        hash_source: bool = False,
        on_bytes: Any = None,
    ) -> tuple[Plan, list[Path]]:
        """Write `source` (a checkpoint file) at revision `to`, atomically, stamped: one
        pass over the bytes. The file is complete for `to`: tensors a step introduces are
        made by their fill, or taken from `model` (an nn.Module at `to`); with neither,
        refused, naming them. Returns the plan and the files written."""
        if not isinstance(out, (str, Path)):
            raise UsageError(f"History.write writes to a path, not {type(out).__name__}")
        if Path(out).suffix != ".safetensors" and max_shard_size is None:
            raise UsageError(  # a stamp lives in safetensors metadata; a .pt file has none
                f"{out}: a file written under a history is .safetensors (or a sharded folder: "
                "max_shard_size=), where its revision stamp is kept",
            )
        if max_shard_size is not None and (type(max_shard_size) is not int or max_shard_size < 1):
            raise UsageError(f"max_shard_size is a number of bytes above 0, not {max_shard_size!r}")
        checkpoint = opened(source)
        if not isinstance(checkpoint, Checkpoint):
            raise UsageError("History.write writes from a checkpoint file (a path)")
        start = self._at(checkpoint, from_)
        end = self.resolve(to)
        if downgrade:
            plan = self.downgrade_plan(checkpoint, end, from_=start, allow_lossy=allow_lossy)
            hops = [(r, "downgrade") for r in reversed(self.path_between(end, start))]
            _only_planned(plan, checkpoint.meta(), allow_lossy)
            made: dict[str, list[str]] = {}
        else:
            steps = self._upgrade_hops(checkpoint, end, start, model)
            hops = [(r, "upgrade") for r in self.path_between(start, end)]
            made = {  # what each step's fills made, and what the model gave: in the stamp
                rev: [f"{k}: {fill.to_text()}" for k, fill in sorted(h.fills.items())]
                for (rev, _), h in zip(hops, steps, strict=True)
            }
            plan, checkpoint = _complete(compose(steps), checkpoint, model, end)
            if isinstance(checkpoint, _WithModel):
                given = sorted(k.removeprefix(MODEL_PREFIX) for k in checkpoint.extra)
                made[end] = made[end] + [f"{k}: the model's" for k in given]
        metadata = provenance(
            plan.rules_fingerprint, plan.fingerprint, checkpoint.files, hash_source
        )
        metadata |= self.stamp(end, checkpoint, hops, made)
        written = write_plan(
            plan,
            checkpoint,
            Path(out),
            metadata=metadata,
            max_shard_size=max_shard_size,
            on_bytes=on_bytes,
            overwrite=overwrite,
        )
        return plan, written

    def stamp(
        self,
        revision: str,
        source: Any,
        steps: list[tuple[str, str]],
        made: dict[str, list[str]] | None = None,
    ) -> dict[str, str]:
        """The metadata a file written at `revision` carries: the revision, the history's
        fingerprint up to it, and every hop that made it (earlier files' hops first)."""
        chain: list[Any] = []
        if isinstance(source, Checkpoint) and STAMP_CHAIN in source.metadata:
            try:
                said = json.loads(source.metadata[STAMP_CHAIN])
            except (ValueError, TypeError, RecursionError):
                said = None
            # an earlier file's hops, kept as they were when they are hops at all
            chain = [h for h in said if isinstance(h, dict)] if isinstance(said, list) else []
        for rev, way in steps:
            hop: dict[str, Any] = {
                "revision": rev,
                "rules": self.steps[rev].program.fingerprint,
                "direction": way,
            }
            if made and made.get(rev):
                hop["made"] = made[rev]  # tensors the step introduced: by which fill, or the model
            chain.append(hop)
        return {
            STAMP_REVISION: self.resolve(revision),
            STAMP_HISTORY: self.fingerprint(revision),
            STAMP_CHAIN: json.dumps(chain, separators=(",", ":")),
        }

    # --- checking it ---
    def check(self) -> list[StepSummary]:
        """Every step planned against its parent's schema, strictly: every rule used, no
        problem, the result the child's schema. Raises HistoryError listing every step
        that does not hold; returns what each step changes."""
        summaries, failures = [], []
        for rev in self.order:
            step = self.steps[rev]
            try:
                schema = self.schema(rev)
                if not step.parents:
                    summaries.append(StepSummary(rev, (), {}, len(schema)))
                    continue
                counts = self._check_step(step, schema)
                summaries.append(StepSummary(rev, step.parents, counts, len(schema)))
            except CkptmapError as e:
                failures.append(e)
        if failures:
            lines = []
            for failure in failures:
                lines.append(failure.message)
                lines += [f"  {d}" for d in failure.details]
            raise HistoryError(
                f"{self.path}: {len(failures)} "
                + ("steps do not hold" if len(failures) != 1 else "step does not hold"),
                code="CKM603",
                details=summarize(lines, 40),
            )
        return summaries

    def _check_step(self, step: Step, schema: dict[str, TensorMeta]) -> dict[str, int]:
        """One step from each parent's schema: clean, every rule used (from some parent),
        the result exactly the step's schema (names, shapes, dtypes); what it changes."""
        used: set[int] = set()
        counts: dict[str, int] = {}
        for parent in step.parents:
            plan = step.program.plan(self.schema(parent), schema, on_unused="ignore")
            refuse_problems(plan, f"{step.file}: {parent} -> {step.id}")
            diff = schema_difference(next_source(plan), schema)
            if diff:
                raise HistoryError(
                    f"{step.file}: from {parent}, the step makes something else than "
                    f"{step.id}'s schema",
                    code="CKM603",
                    details=diff,
                )
            used |= {r.id for r in plan.rules} - set(plan.unused_rules)
            for k, n in _changes(plan).items():
                counts[k] = max(counts.get(k, 0), n)
        unused = [
            r
            for r in step.program.rules
            if r.id not in used and r.role != "revision" and not r.node.optional
        ]
        if unused:
            raise HistoryError(
                f"{step.file}: {len(unused)} rule{'s' * (len(unused) != 1)} "
                f"match nothing in {', '.join(step.parents)}",
                code="CKM603",
                details=[r.where() for r in unused],
                hint="a step's every rule must do something (remove it, or mark it optional)",
            )
        return counts


@dataclass
class StepSummary:
    """What one step changes, by kind (for `ckptmap history`)."""

    revision: str
    parents: tuple[str, ...]
    changes: dict[str, int]
    tensors: int

    def __str__(self) -> str:
        if not self.parents:
            return f"{self.revision} (base, {self.tensors} tensors)"
        said = ", ".join(f"{n} {k}" for k, n in self.changes.items() if n) or "no change"
        return f"{self.revision} <- {', '.join(self.parents)}: {said}"


def _changes(plan: Plan) -> dict[str, int]:
    made = {o.target: o for o in plan.outputs if o.status == "loaded"}
    renamed = transformed = 0
    stepped = {v for s in plan.steps for v in s.outputs}
    for o in made.values():
        if o.value in stepped:
            transformed += 1
        elif o.sources != [o.target]:
            renamed += 1
    return {
        "renamed": renamed,
        "transformed": transformed,
        "added": len(introduced(plan)),
        "removed": sum(e.status in ("skipped", "unexpected") for e in plan.sources),
    }


def _fills(program: Program, plan: Plan) -> dict[str, OpCall]:
    """{introduced key: the fill its init declares}, for the keys whose init has one."""
    out = {}
    for name, t in introduced(plan).items():
        node = program.rules[t.rules[0]].node if t.rules else None
        if isinstance(node, Init) and node.fill is not None:
            out[name] = node.fill
    return out


MODEL_PREFIX = "model:"  # a tensor a file at a revision takes from the model, as a source


def _complete(plan: Plan, checkpoint: Any, model: Any, revision: str) -> tuple[Plan, Any]:
    """A file at a revision holds every tensor of it: what the plan leaves to the model
    (introduced with no fill, missing or mismatched under a step's relaxed policy) is taken
    from `model`, as sources named `model:KEY`; with no model it is refused."""
    left = [
        t
        for t in plan.targets or ()
        if t.status == "missing" or (t.status == "initialized" and t.reason != "fill")
    ]
    if not left:
        return plan, checkpoint
    why = {"init": "introduced with no fill", "mismatch": "a shape mismatch skipped"}
    if model is None:
        raise HistoryError(
            f"{len(left)} tensor{'s' * (len(left) != 1)} of {revision} come from no source: "
            "no fill or model says what they hold",
            code="CKM606",
            details=summarize(
                f"{t.target} ({why.get(t.reason or '', 'missing under a step policy')})"
                for t in left
            ),
            hint='give the init a fill (init "..." | zeros()), or the model: '
            "--target pkg.mod:factory / model=",
        )
    state = model.state_dict()
    values, sources, outputs = list(plan.values), list(plan.sources), list(plan.outputs)
    targets = {t.target: t for t in plan.targets or ()}
    extra = {}
    for t in left:
        name = MODEL_PREFIX + t.target
        tensor = state[t.target].detach()
        extra[name] = tensor
        dtype = str(tensor.dtype).removeprefix("torch.")
        v = len(values)
        values.append(Value(shape=list(t.shape), dtype=dtype))
        sources.append(
            SourceEntry(
                source=name,
                value=v,
                target=t.target,
                shape=list(t.shape),
                dtype=dtype,
                status="loaded",
                rules=t.rules,
            )
        )
        outputs.append(
            OutputEntry(
                target=t.target,
                value=v,
                shape=list(t.shape),
                dtype=dtype,
                sources=[name],
                status="loaded",
                rules=t.rules,
            )
        )
        targets[t.target] = TargetEntry(
            target=t.target,
            shape=t.shape,
            dtype=t.dtype,
            status="loaded",
            sources=[name],
            rules=t.rules,
        )
    plan = plan.replaced(
        values=values,
        sources=sources,
        outputs=sorted(outputs, key=lambda o: o.target),
        targets=sorted(targets.values(), key=lambda t: t.target),
    )
    return plan, _WithModel(checkpoint, extra)


class _WithModel(Checkpoint):
    """A checkpoint and the model's tensors for what it lacks, as one source."""

    def __init__(self, base: Checkpoint, extra: dict[str, Any]) -> None:
        super().__init__(base.path)
        self.base, self.extra = base, extra
        self.notes = base.notes

    @property
    def files(self) -> list[Path]:
        return self.base.files

    @property
    def metadata(self) -> dict[str, str]:
        return self.base.metadata

    @property
    def aliases(self) -> dict[str, str]:
        return self.base.aliases

    def meta(self) -> dict[str, TensorMeta]:
        own = {
            k: TensorMeta(tuple(t.shape), str(t.dtype).removeprefix("torch."))
            for k, t in self.extra.items()
        }
        return {**self.base.meta(), **own}

    def get(self, name: str) -> Any:
        return self.extra[name] if name in self.extra else self.base.get(name)

    def done(self, name: str) -> None:
        if name not in self.extra:
            self.base.done(name)

    def raw(self, name: str) -> Any:
        return None if name in self.extra else self.base.raw(name)

    def ties(self) -> dict[str, tuple[str, ...]]:
        return self.base.ties()


def _run(plan: Plan, source: Any) -> tuple[dict[str, torch.Tensor], Report]:
    return apply_plan(plan, source), plan.report(frozen=[])


def _only_planned(plan: Plan, source: Any, allow_lossy: bool) -> Any:
    """A downgrade's source less what the older revision does not have: those tensors are
    lost on the way back, refused unless allowed."""
    tensors = tensors_of(source)
    planned = {e.source for e in plan.sources}
    extra = sorted(set(tensors) - planned)
    if extra and not allow_lossy:
        raise PlanError(
            f"the older revision has no place for {len(extra)} tensor{'s' * (len(extra) != 1)}",
            code="CKM308",
            details=summarize(
                f"{k} cannot be kept: the revision it goes back to has no such tensor"
                for k in extra
            ),
            hint="allow_lossy=True / --allow-lossy drops them",
        )
    return {k: tensors[k] for k in tensors if k in planned} if extra else source


def _meta(source: Any) -> dict[str, TensorMeta]:
    return describe(source, role="source").meta


def schema_difference(
    have: Mapping[str, TensorMeta], want: Mapping[str, TensorMeta], dtypes: bool = True
) -> list[str]:
    """What differs between a checkpoint's tensors and a schema, in a person's words."""
    diff = []
    missing = sorted(set(want) - set(have))
    extra = sorted(set(have) - set(want))
    if missing:
        diff.append(f"{len(missing)} missing ({_few(missing)})")
    if extra:
        diff.append(f"{len(extra)} extra ({_few(extra)})")
    shapes = [
        k for k in sorted(set(have) & set(want)) if tuple(have[k].shape) != tuple(want[k].shape)
    ]
    if shapes:
        k = shapes[0]
        diff.append(
            f"{len(shapes)} of another shape ({k}: {list(have[k].shape)}, the schema "
            f"{list(want[k].shape)})"
        )
    other = [
        k
        for k in sorted(set(have) & set(want))
        if dtypes and have[k].dtype and want[k].dtype and have[k].dtype != want[k].dtype
    ]
    if other:
        k = other[0]
        diff.append(
            f"{len(other)} of another dtype ({k}: {have[k].dtype}, the schema {want[k].dtype})"
        )
    return diff


def _few(keys: list[str]) -> str:
    folded = [k for k, _ in collapse_keys(keys)]
    return ", ".join(folded[:3]) + (", …" if len(folded) > 3 else "")


# --- the files ---


def _stem(path: Path) -> str:
    return path.name[: -len(path.suffix)] if path.suffix else path.name


def _read_steps(folder: Path) -> dict[str, Step]:
    steps: dict[str, Step] = {}
    files = sorted(_rule_files(folder))
    if not files:
        raise HistoryError(
            f"{folder}: no revision steps (.ckmap, .yaml, .json) in this folder",
            code="CKM601",
            hint=f"start one: ckptmap revision {folder} -m 'base' --base CHECKPOINT",
        )
    for f in files:
        program = compile(f)
        rev = program.revision
        if rev is None:
            raise HistoryError(
                f'{f}: a file of a history starts with `revision "ID"` (and `from "PARENT"`)',
                code="CKM601",
            )
        if rev.id in steps:
            raise HistoryError(
                f"revision {rev.id!r} is declared twice: {steps[rev.id].file} and {f}",
                code="CKM602",
            )
        steps[rev.id] = Step(rev.id, rev.parents, f, program)
    for step in steps.values():
        for p in step.parents:
            if p not in steps:
                raise HistoryError(
                    f"{step.file}: revision {step.id} comes from {p!r}, which no file declares",
                    code="CKM602",
                )
    return steps


def _topological(steps: dict[str, Step]) -> list[str]:
    """Revisions, each after its parents (ties by id); one base; no cycle."""
    bases = sorted(r for r, s in steps.items() if not s.parents)
    if len(bases) != 1:
        raise HistoryError(
            f"a history has one base revision (no `from`), this one has {len(bases)}"
            + (f": {', '.join(bases)}" if bases else " (every revision has a parent: a cycle)"),
            code="CKM602",
        )
    order: list[str] = []
    waiting = {r: set(s.parents) for r, s in steps.items()}
    ready = [r for r, ps in waiting.items() if not ps]
    while ready:
        ready.sort()
        rev = ready.pop(0)
        order.append(rev)
        for r, ps in waiting.items():
            if rev in ps:
                ps.discard(rev)
                if not ps and r not in order and r not in ready:
                    ready.append(r)
    if len(order) != len(steps):
        stuck = sorted(set(steps) - set(order))
        raise HistoryError(
            f"the history's revisions form a cycle: {', '.join(stuck)}", code="CKM602"
        )
    return order


def read_schema(path: Path) -> dict[str, TensorMeta]:
    """A schema snapshot: {"ckptmap_schema": 1, "revision": ID, "tensors": {name: {shape, dtype}}}."""
    check_text_size(path, HistoryError, "CKM604")
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as e:
        raise HistoryError(f"{path}: not a schema: {str(e)[:200]}", code="CKM604") from None
    tensors = doc.get("tensors") if isinstance(doc, dict) else None
    if (
        not isinstance(tensors, dict)
        or type(doc.get("ckptmap_schema")) is not int
        or doc.get("ckptmap_schema") != SCHEMA_FORMAT
    ):
        raise HistoryError(
            f'{path}: not a ckptmap schema ({{"ckptmap_schema": 1, "tensors": {{...}}}})',
            code="CKM604",
        )
    out = {}
    for name, entry in tensors.items():
        shape = entry.get("shape") if isinstance(entry, dict) else None
        dtype = entry.get("dtype") if isinstance(entry, dict) else None
        if (
            not name
            or not isinstance(shape, list)
            or not all(type(d) is int and 0 <= d < 2**63 for d in shape)
            or not (dtype is None or dtype in _DTYPE_NAMES)
        ):
            raise HistoryError(
                f'{path}: {name}: not {{"shape": [whole numbers], "dtype": "float32"}}',
                code="CKM604",
            )
        out[name] = TensorMeta(tuple(shape), dtype)
    return meta_of(out, f"schema {path.name}")


_DTYPE_NAMES = frozenset(name for name, _ in DTYPES.values())


def schema_text(revision: str, meta: Mapping[str, TensorMeta]) -> str:
    """A schema snapshot as the history keeps it (sorted, one tensor a line)."""
    lines = [
        f'    {json.dumps(name)}: {{"shape": {json.dumps(list(m.shape))}, "dtype": {json.dumps(m.dtype)}}}'
        for name, m in sorted(meta.items())
    ]
    body = ",\n".join(lines)
    return (
        f'{{\n  "ckptmap_schema": {SCHEMA_FORMAT},\n  "revision": {json.dumps(revision)},\n'
        f'  "tensors": {{\n{body}\n  }}\n}}\n'
    )


@needs_torch("ckptmap.upgrade_on_load")
def upgrade_on_load(model: torch.nn.Module, history: History | str | Path) -> Any:
    """Make `model.load_state_dict(old)` upgrade an old state_dict in memory first: a
    `load_state_dict` pre-hook finds the state_dict's revision and maps it through the
    steps to the model's (head when no revision's schema is the model's), strictly (a plan
    problem raises). Frameworks that resume through `load_state_dict` get it too. A
    state_dict at no revision of the history is left to torch's own strict check. The
    caller's dict is never changed (torch hands the hook its own copy). Returns the hook's
    handle (`.remove()` undoes it)."""
    import torch

    if not isinstance(model, torch.nn.Module):
        raise UsageError(f"upgrade_on_load hooks an nn.Module, not {type(model).__name__}")
    if not isinstance(history, History):
        history = History(history)
    end = history.revision_of(model) or history.head

    def hook(module: Any, state_dict: Any, prefix: str, *_: Any) -> None:
        if LOADING.get():  # ckptmap.load_into is loading: its plan has mapped every key
            return
        # the hooked model may sit inside another (a Lightning module, a wrapper): its keys
        # are those under its prefix
        mine = {k[len(prefix) :]: v for k, v in state_dict.items() if k.startswith(prefix)}
        found = history.current(mine)
        if found.revision is None and found.alike:
            raise HistoryError(
                f"the state_dict matches {', '.join(found.alike)} alike: which revision it is "
                "at cannot be told from its names and shapes",
                code="CKM605",
                hint="load it with ckptmap.load_into(model, state_dict, history, from_=REV)",
            )
        if found.revision is None or found.revision == end:
            return  # at no revision: torch's own strict check says what is wrong
        plan = history.plan(mine, end, from_=found.revision, model=module)
        upgraded = apply_plan(plan, mine)
        own = module.state_dict()
        for t in plan.targets or ():  # introduced with no fill: the model's own values
            if t.status == "initialized" and t.target not in upgraded and t.target in own:
                upgraded[t.target] = own[t.target]
        for k in [k for k in state_dict if k.startswith(prefix)]:
            del state_dict[k]
        state_dict.update((prefix + k, v) for k, v in upgraded.items())

    return model.register_load_state_dict_pre_hook(hook)


def new_revision(
    folder: str | Path,
    message: str,
    revision: str | None = None,
    *,
    base: Any = None,
    schema: Any = None,
    autogenerate: bool = False,
) -> list[Path]:
    """Write a new step file (`revision "ID" from "HEAD"`, its rules left for the author)
    or, with `base` (a checkpoint path, state_dict or nn.Module), the first revision of a
    new history and its schema snapshot. `schema` snapshots the new revision's schema (a
    step that adds tensors needs one). `autogenerate` fills the step's body with what
    `suggest` finds from the head's schema to `schema`'s, its evidence as comments, as
    Alembic's autogenerate does. Returns the files written; none is ever replaced."""

    folder = Path(folder)
    if base is not None and schema is not None:
        raise UsageError("--base is the first revision's schema; --target a later one's: one")
    if autogenerate and schema is None:
        raise UsageError("--autogenerate writes the step from the head's schema to --target's")
    if folder.exists() and not folder.is_dir():
        raise HistoryError(f"{folder}: not a folder", code="CKM601")
    snapshot = base if base is not None else schema
    # the schema is read before anything is written: a source that fails leaves nothing
    meta = describe(snapshot, role="schema").meta if snapshot is not None else None
    if base is not None:
        if folder.is_dir() and any(_rule_files(folder)):
            raise HistoryError(
                f"{folder} already holds revision steps: --base starts a new history",
                code="CKM608",
            )
        folder.mkdir(parents=True, exist_ok=True)
        parents: tuple[str, ...] = ()
        number = 1
        taken: set[str] = set()
    else:
        hist = History(folder)
        parents, number, taken = (hist.head,), len(hist.steps) + 1, set(hist.steps)
    rev = revision or f"{number:04d}-{_slug(message)}"
    node = Revision(rev, parents)  # checks the id
    step_file = folder / f"{rev}.ckmap"
    files = [step_file]
    if meta is not None:
        files.append(folder / f"{rev}{SCHEMA_SUFFIX}")
    for path in files:
        if rev in taken or path.exists():
            raise HistoryError(f"{path}: revision {rev!r} is already taken", code="CKM608")
    comment = " ".join(message.split()) or "(no message)"
    body = "" if base is not None else f"\n# the rules from {parents[0]}'s names to {rev}'s\n"
    if autogenerate and meta is not None:
        found = suggest(hist.schema(hist.head), meta)
        body = f"\n# suggested from {parents[0]}'s schema to {rev}'s: check each rule\n"
        body += found.body()
    text = f"ckptmap 1\n\n# {comment}\n{node.to_text()}\n{body}"
    if meta is not None:
        write_text_atomically(files[1], schema_text(rev, meta))
    write_text_atomically(step_file, text)
    return files


def _rule_files(folder: Path) -> list[Path]:
    return [
        p
        for p in folder.iterdir()
        if p.is_file() and p.suffix in RULE_SUFFIXES and not p.name.endswith(SCHEMA_SUFFIX)
    ]


def _slug(message: str) -> str:
    words = "".join(c if c.isascii() and c.isalnum() else " " for c in message.lower()).split()
    return "-".join(words)[:40].strip("-") or "step"


def refuse_other_revision(program: Program, source: Any) -> None:
    """A step file applied on its own (`ckptmap apply 0003.ckmap`) to a checkpoint stamped
    at another revision than the step's parent is refused: its rules speak of other names."""
    rev = program.revision
    stamp = source.metadata.get(STAMP_REVISION) if isinstance(source, Checkpoint) else None
    if rev is None or stamp is None or not rev.parents or stamp in rev.parents:
        return
    raise HistoryError(
        f"{source.path} is at revision {stamp} (its stamp); {rev.id} is a step from "
        f"{', '.join(rev.parents)}",
        code="CKM605",
        hint="upgrade through the history: ckptmap upgrade SOURCE --history FOLDER --to " + rev.id,
    )
