"""Compiler: a Ruleset becomes a reusable, checked `Program` (like `re.compile`).

The passes run in order: splice includes, then compile every pattern and
target once. Every error points at the span of the rule that caused it.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import PlanError, RuleCompileError, RuleSyntaxError, Span, UsageError, line_of
from .ops import Op, OpArgError, make
from .patterns import SKIP, Matcher, PatternError, RegexTimeout, Template
from .rules import (
    ACTIONS,
    Freeze,
    Include,
    Init,
    Merge,
    Pattern,
    Policy,
    Prefix,
    Rename,
    Ruleset,
    Skip,
    Split,
    Statement,
    Strip,
    Transform,
    Unfreeze,
    quote,
    regex_literal,
)
from .shipped import SHIPPED_PREFIX, shipped_rule_file
from .syntax import load_rules, parse

if TYPE_CHECKING:
    from .plan import Plan

DEFAULT_POLICIES = {
    "mismatch": "error",
    "missing": "error",
    "unexpected": "error",
    "unused": "error",
}


@dataclass(frozen=True, eq=False)
class Rule:
    """One compiled statement: its number in the program, canonical text, span, matcher."""

    id: int
    node: Statement
    matcher: Matcher | None = None
    template: Template | None = None
    matchers: tuple[Matcher, ...] = ()  # merge: one per source pattern
    templates: tuple[Template, ...] = ()  # split: one per target
    ops: tuple[Op, ...] = ()
    gather: str | None = None  # merge/split: the capture that numbers the pieces

    @property
    def text(self) -> str:
        return self.node.to_text()

    @property
    def span(self) -> Span | None:
        return self.node.span

    def step(self, name: str) -> Any:
        """Apply a pipeline statement to a key: the new name, SKIP, or None when it does not match."""
        node = self.node
        if isinstance(node, Strip):
            return name[len(node.prefix) :] if name.startswith(node.prefix) else None
        if isinstance(node, Prefix):
            return node.prefix + name
        m = self.matcher.match(name)  # type: ignore[union-attr]
        if m is None:
            return None
        if isinstance(node, Skip):
            return SKIP
        new = self.template.render(m.captures)  # type: ignore[union-attr]
        return new + m.rest if new else m.rest.removeprefix(".")

    def matches(self, name: str) -> bool:
        return self.matcher is not None and self.matcher.match(name) is not None

    def where(self) -> str:
        """`rename "a" -> "b" (rules.ckmap:3:1)`: the rule as people read it."""
        return f"{self.text} ({self.span})" if self.span else self.text


class Program:
    """Compiled, checked rules; `plan(source, target)` binds them to concrete keys."""

    def __init__(self, ruleset: Ruleset, rules: tuple[Rule, ...], files: tuple[Path, ...] = ()):
        self.ruleset = ruleset
        self.rules = rules
        self.files = files  # the rule files read (includes too): inputs a writer must not touch
        pipeline = (Strip, Prefix, Rename, Skip, Transform, Merge, Split)
        self.steps = tuple(r for r in rules if isinstance(r.node, pipeline))
        self.inits = tuple(r for r in rules if isinstance(r.node, Init))
        self.trainability = tuple(r for r in rules if isinstance(r.node, (Freeze, Unfreeze)))
        self.policies = dict(DEFAULT_POLICIES)
        for r in rules:
            if isinstance(r.node, Policy):  # the last word on a problem wins, like sed
                self.policies[r.node.problem] = r.node.action
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
        from .io import describe
        from .resolve import _no_gc, build_plan

        policies = overridden(
            self.policies,
            mismatch=on_mismatch,
            missing=on_missing,
            unexpected=on_unexpected,
            unused=on_unused,
        )
        with _no_gc():  # headers and plans: many small objects, none of them garbage
            target_desc = describe(target, role="target") if target is not None else None
            source_desc = describe(source, role="source")
            try:
                return build_plan(self, source_desc, target_desc, policies)
            except RegexTimeout as e:
                raise PlanError(e.message, code=e.code) from None

    def __repr__(self) -> str:
        return f"<Program {len(self.rules)} rules {self.fingerprint[:19]}>"


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


def compile_rule(number: int, statement: Statement, text: str | None = None) -> Rule:
    """Build the matcher and target template of one statement, checking captures."""
    if isinstance(statement, (Transform, Merge, Split)):
        return _compile_transform(number, statement, text)
    pattern: Pattern | None = getattr(statement, "pattern", None)
    if pattern is None:
        return Rule(number, statement)
    try:
        matcher = Matcher(pattern.text, pattern.regex)
    except PatternError as e:
        raise _pattern_error(e, pattern, statement, text) from None
    template = None
    if isinstance(statement, Rename):
        try:
            template = Template(statement.target)
        except PatternError as e:
            hint = _capture_hint(statement) if e.code == "CKM212" else None
            raise _target_error(e, statement, text, e.message, hint=hint) from None
        for name, offset in template.refs:
            if name not in matcher.names:
                bound = ", ".join(f"{{{n}}}" for n in sorted(matcher.names, key=_capture_order))
                e = PatternError("", offset)
                raise _target_error(
                    e,
                    statement,
                    text,
                    f"capture {{{name}}} is used in the target but the pattern never binds it",
                    code="CKM202",
                    hint=f"the pattern binds {bound}" if bound else "the pattern binds no captures",
                )
    return Rule(number, statement, matcher, template)


def _matcher(pattern: Pattern, statement: Statement, text: str | None) -> Matcher:
    try:
        return Matcher(pattern.text, pattern.regex)
    except PatternError as e:
        raise _pattern_error(e, pattern, statement, text) from None


def _template(target: str, statement: Statement, text: str | None) -> Template:
    try:
        return Template(target)
    except PatternError as e:
        hint = _CAPTURE_EXAMPLE if e.code == "CKM212" else None
        raise _error(
            e.code, f"{e.message} (target {target!r})", statement.span, text, hint=hint
        ) from None


_CAPTURE_EXAMPLE = (
    'capture in the pattern, name it in the target: "blocks.{i}.attn" -> "layers.{i}.attn"'
)


def _capture_hint(statement: Rename) -> str:
    """The rename with each `*` (in pattern and target alike) as a named capture, when
    they pair up; else the general example."""
    pattern = statement.pattern
    stars = statement.target.count("*")
    if pattern.regex or "**" in pattern.text or pattern.text.count("*") != stars:
        return _CAPTURE_EXAMPLE
    taken = set(re.findall(r"\{(\w+)\}", pattern.text))  # names the pattern already binds
    free = "".join(c for c in "ijklmnpqrstuvwxyz" if c not in taken)
    fixed = []
    for text in (pattern.text, statement.target):
        parts = text.split("*")
        fixed.append(
            "".join(
                p + (f"{{{n}}}" if k < stars else "")
                for k, (p, n) in enumerate(zip(parts, free, strict=False))
            )
        )
    return f"write: rename {quote(fixed[0])} -> {quote(fixed[1])}"


_KINDS = {"one": "one-to-one", "merge": "many-to-one", "split": "one-to-many"}


def _compile_ops(statement: Transform | Merge | Split, text: str | None) -> tuple[Op, ...]:
    ops = []
    for call in statement.ops:
        try:
            ops.append(make(call.name, call.args))
        except OpArgError as e:
            raise _error("CKM208", str(e), call.span or statement.span, text) from None
    kinds = [op.kind for op in ops]
    if isinstance(statement, Transform):
        wanted = ["one"] * len(ops)
        example = "many-to-one ops go in merge, one-to-many ops in split"
    elif isinstance(statement, Merge):
        wanted = ["merge"] + ["one"] * (len(ops) - 1)
        example = "merge ... | cat(0) or | stack(0), then one-to-one ops"
    else:
        wanted = ["one"] * (len(ops) - 1) + ["split"]
        example = "split ... | one-to-one ops, then split([...], dim) or unstack(dim) last"
    for op, call, kind, want in zip(ops, statement.ops, kinds, wanted, strict=True):
        if kind != want:
            raise _error(
                "CKM210",
                f"{op.name} is {_KINDS[kind]}; here {statement.keyword} needs {_KINDS[want]}",
                call.span or statement.span,
                text,
                hint=example,
            )
    return tuple(ops)


def _compile_transform(number: int, statement: Transform | Merge | Split, text: str | None) -> Rule:
    ops = _compile_ops(statement, text)
    if isinstance(statement, Transform):
        return Rule(
            number, statement, matcher=_matcher(statement.pattern, statement, text), ops=ops
        )
    if isinstance(statement, Merge):
        matchers = tuple(_matcher(p, statement, text) for p in statement.patterns)
        template = _template(statement.target, statement, text)
        bound = frozenset.intersection(*(m.names for m in matchers))
        used = {name for name, _ in template.refs}
        for name in sorted(used - bound):
            raise _error(
                "CKM202",
                f"capture {{{name}}} is used in the target but not bound by every source pattern",
                statement.span,
                text,
            )
        gather = None
        extra = sorted(n for n in bound - used if not n.isdigit())
        if len(matchers) == 1:
            if len(extra) != 1:
                raise _error(
                    "CKM211",
                    "a merge of one pattern gathers over one capture the target does not use; "
                    f"this one has {len(extra)}",
                    statement.span,
                    text,
                    hint='merge "experts.{e}.w1" -> "experts.w1" | stack(0)',
                )
            gather = extra[0]
        elif extra:
            raise _error(
                "CKM211",
                f"capture {{{extra[0]}}} is bound but not in the target, so "
                "the sources cannot be grouped",
                statement.span,
                text,
            )
        return Rule(number, statement, matchers=matchers, template=template, ops=ops, gather=gather)
    matcher = _matcher(statement.pattern, statement, text)
    templates = tuple(_template(t, statement, text) for t in statement.targets)
    gather = None
    for template in templates:
        unbound = sorted({n for n, _ in template.refs} - matcher.names)
        if unbound and len(templates) == 1 and len(unbound) == 1:
            gather = unbound[0]  # "experts.{e}.w1": one target per piece, numbered
        elif unbound:
            raise _error(
                "CKM202",
                f"capture {{{unbound[0]}}} is used in a target but the pattern never binds it",
                statement.span,
                text,
                hint="one target with one new capture numbers the pieces: "
                '"experts.{e}.w1" | unstack(0)',
            )
    return Rule(number, statement, matcher=matcher, templates=templates, ops=ops, gather=gather)


def _capture_order(name: str) -> tuple[int, int | str]:
    return (0, int(name)) if name.isdigit() else (1, name)


def compile(rules: Any) -> Program:
    """Compile rules (a Ruleset, a Program, DSL text or a rule file Path) into a Program.

    A list of any of these is compiled as one program, in order.
    """
    if isinstance(rules, Program):
        return rules
    if isinstance(rules, (list, tuple)):  # several rule sources, applied in order
        statements, files = [], []
        for part in rules:
            program = compile(part)
            statements += [(r.node, None) for r in program.rules]
            files += program.files
        merged = Ruleset(rules=tuple(s for s, _ in statements))
        return Program(
            merged,
            tuple(compile_rule(i, s) for i, (s, _) in enumerate(statements)),
            tuple(dict.fromkeys(files)),
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
    return Program(
        rules,
        tuple(compile_rule(i, s, t) for i, (s, t) in enumerate(statements)),
        tuple(dict.fromkeys(files)),
    )


# --- errors ----------------------------------------------------------------------------------


def _error(
    code: str, message: str, span: Span | None, text: str | None, hint=None, details=()
) -> RuleCompileError:
    line_text = line_of(text, span.line) if span else None
    return RuleCompileError(
        message, code=code, span=span, line_text=line_text, hint=hint, details=details
    )


def _pattern_error(
    e: PatternError, pattern: Pattern, statement: Statement, text: str | None
) -> RuleCompileError:
    span = pattern.span or statement.span
    details = [f"pattern: {pattern.text}", f"         {' ' * e.offset}^"]
    if span is not None and span.end_column is not None:  # a DSL token: point inside it
        render = regex_literal if pattern.regex else quote
        inside = len(render(pattern.text[: e.offset])) - 1
        span = Span(file=span.file, line=span.line, column=span.column + inside)
        details = []
    return _error(e.code, e.message, span, text, details=details)


def _target_error(
    e: PatternError, statement: Rename, text: str | None, message: str, code=None, hint=None
) -> RuleCompileError:
    span = statement.span
    line = line_of(text, span.line) if span else None
    details = [f"target: {statement.target}", f"        {' ' * e.offset}^"]
    if span is not None and span.end_column is not None and line:
        start = line.rfind(quote(statement.target))  # the target is the line's last string
        if start >= 0:
            inside = len(quote(statement.target[: e.offset]))
            span = Span(file=span.file, line=span.line, column=start + inside)
            details = []
    return _error(code or e.code, message, span, text, hint=hint, details=details)
