"""Compiler: a Ruleset becomes a reusable, checked `Program` (like `re.compile`).

The passes run in order: splice includes, then compile every pattern and
target once. Every error points at the span of the rule that caused it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import PlanError, RuleSyntaxError, UsageError
from .patterns import RegexTimeout
from .rules import (
    ACTIONS,
    Include,
    Revision,
    Ruleset,
    Statement,
)
from .shipped import SHIPPED_PREFIX, shipped_rule_file
from .statements import Rule, _error, compile_rule
from .syntax import load_rules, parse

if TYPE_CHECKING:
    from .plan import Plan

DEFAULT_POLICIES = {
    "mismatch": "error",
    "missing": "error",
    "unexpected": "error",
    "unused": "error",
}


class Program:
    """Compiled, checked rules; `plan(source, target)` binds them to concrete keys."""

    def __init__(self, ruleset: Ruleset, rules: tuple[Rule, ...], files: tuple[Path, ...] = ()):
        self.ruleset = ruleset
        self.rules = rules
        self.files = files  # the rule files read (includes too): inputs a writer must not touch
        self.steps = tuple(r for r in rules if r.role == "pipeline")
        self.inits = tuple(r for r in rules if r.role == "init")
        self.trainability = tuple(r for r in rules if r.role == "trainability")
        revisions = [r.node for r in rules if r.role == "revision"]
        # the step of a history this file is (`revision "ID" from "P"`), or None
        self.revision: Revision | None = revisions[0] if len(revisions) == 1 else None  # type: ignore[assignment]
        self.policies = dict(DEFAULT_POLICIES)
        for r in rules:
            if r.role == "policy":  # the last word on a problem wins, like sed
                self.policies[r.node.problem] = r.node.action  # type: ignore[attr-defined]
        text = self.to_text().encode("utf-8", "surrogatepass")  # a lone surrogate is text too
        self.fingerprint = "sha256:" + hashlib.sha256(text).hexdigest()

    def to_text(self) -> str:
        """The program as canonical rule text, includes spliced in."""
        return Ruleset(rules=tuple(r.node for r in self.rules)).to_text()

    def plan(
        self,
        source: Any,
        target: Any = None,
        *,
        on_mismatch: str | None = None,
        on_missing: str | None = None,
        on_unexpected: str | None = None,
        on_unused: str | None = None,
    ) -> Plan:
        """Bind the rules to a source (and optionally a target): names, shapes and dtypes only.

        `source` and `target` may be a state_dict, a `{name: shape}` mapping, an
        `nn.Module` or a checkpoint path. Per-call policies override the rules'.
        """
        # the readers and the planner load on first use: `import ckptmap` stays light
        from .alloc import no_gc
        from .io import describe
        from .resolve import build_plan

        policies = overridden(
            self.policies,
            mismatch=on_mismatch,
            missing=on_missing,
            unexpected=on_unexpected,
            unused=on_unused,
        )
        with no_gc():  # headers and plans: many small objects, none of them garbage
            target_desc = describe(target, role="target") if target is not None else None
            source_desc = describe(source, role="source")
            try:
                return build_plan(self, source_desc, target_desc, policies)
            except RegexTimeout as e:
                raise PlanError(e.message, code=e.code) from None

    def __repr__(self) -> str:
        return f"<Program {len(self.rules)} rules {self.fingerprint[:19]}>"


def _check_revision(ruleset: Ruleset, statements: list[tuple[Statement, str | None]]) -> None:
    """A `revision` statement names the file it stands in: once, before every other
    statement, and never in an included file (which is no step of its own)."""
    own = {id(s) for s in ruleset.rules}
    for i, (s, text) in enumerate(statements):
        if not isinstance(s, Revision):
            continue
        if id(s) not in own:
            where = "an included file"
        elif i != 0:
            where = "the middle of the file"
        else:
            continue
        raise _error(
            "CKM214",
            f"{s.to_text()} stands in {where}: a revision statement comes first in the step's "
            "own file, once",
            s.span,
            text,
            hint="one file is one step of a history: its first statement says which",
        )


def overridden(policies: dict[str, str], **actions: str | None) -> dict[str, str]:
    """`policies` with the per-call actions that are given (`on_missing="warn"`), checked."""
    out = dict(policies)
    for problem, action in actions.items():
        if action is None:
            continue
        if action not in ACTIONS[problem]:
            raise UsageError(
                f"on_{problem}={action!r}: on_{problem} takes "
                + ", ".join(repr(a) for a in ACTIONS[problem]),
                code="CKM002",
            )
        out[problem] = action
    return out


# --- passes --------------------------------------------------------------------------------


def splice_includes(
    ruleset: Ruleset, stack: tuple[Path, ...] = (), files: list[Path] | None = None
) -> Iterator[tuple[Statement, str | None]]:
    """Every statement (with its file's text), `include` replaced by the included statements.
    The files read are added to `files`."""
    where = ruleset.file
    if where and where.startswith(SHIPPED_PREFIX):  # its own includes are relative to it
        where = str(shipped_rule_file(where))
    base = Path(where).parent if where else Path.cwd()
    if not stack and where:
        stack = (Path(where).resolve(),)
    if files is not None and where:
        files.append(Path(where))
    for statement in ruleset.rules:
        if not isinstance(statement, Include):
            yield statement, ruleset.text
            continue
        here = ruleset.text
        if statement.path.startswith(SHIPPED_PREFIX):  # a rule file that ships with ckptmap
            try:
                shipped = shipped_rule_file(statement.path)
            except RuleSyntaxError as e:
                raise _error("CKM206", e.message, statement.span, here, hint=e.hint) from None
            if shipped.resolve() in stack:
                chain = " -> ".join(p.name for p in (*stack, shipped))
                raise _error("CKM204", f"include cycle: {chain}", statement.span, here)
            yield from splice_includes(
                load_rules(statement.path), (*stack, shipped.resolve()), files
            )
            continue
        folder = base.resolve()
        path = (folder / statement.path).resolve()
        if not path.is_relative_to(folder):
            raise _error(
                "CKM205",
                f"include {statement.path!r} reaches outside the folder of the including file",
                statement.span,
                here,
                hint=f"included files must be under {folder}",
            )
        if path in stack:
            chain = " -> ".join(p.name for p in (*stack, path))
            raise _error("CKM204", f"include cycle: {chain}", statement.span, here)
        if not path.is_file():
            raise _error("CKM206", f"included file not found: {path}", statement.span, here)
        # spans name the file as the user would: relative to how the including file was named
        yield from splice_includes(load_rules(base / statement.path), (*stack, path), files)


def compile(rules: Any) -> Program:
    """Compile rules (a Ruleset, a Program, DSL text or a rule file Path) into a Program.

    A list of any of these is compiled as one program, in order.
    """
    if isinstance(rules, Program):
        return rules
    if isinstance(rules, (list, tuple)):  # several rule sources, applied in order
        nodes: list[Statement] = []
        read: list[Path] = []
        for part in rules:
            program = compile(part)
            nodes += [r.node for r in program.rules]
            read += program.files
        return Program(
            Ruleset(rules=tuple(nodes)),
            tuple(compile_rule(i, s) for i, s in enumerate(nodes)),
            tuple(dict.fromkeys(read)),
        )
    if isinstance(rules, Path):
        rules = load_rules(rules)
    elif isinstance(rules, str):
        rules = parse(rules)
    elif not isinstance(rules, Ruleset):
        raise UsageError(
            f"rules must be a Ruleset, a Program, rule text or a Path, not {type(rules).__name__}"
        )
    files: list[Path] = []
    statements = list(splice_includes(rules, files=files))
    _check_revision(rules, statements)
    return Program(
        rules,
        tuple(compile_rule(i, s, t) for i, (s, t) in enumerate(statements)),
        tuple(dict.fromkeys(files)),
    )
