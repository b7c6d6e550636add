"""One compiled class per statement kind: how it is built from its IR node (matchers,
templates and ops, checked, every error at the rule's span), what it does to a key, and
how the planner applies it (`plan(builder)`, and for key renames the bucket shortcuts:
`bucket_test`, `whole_buckets`, `recipe`).

A new statement is one IR node (rules.py), one class here registered in `COMPILED`,
and its grammar rule.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from .errors import RuleCompileError, line_of
from .ops import Op, OpArgError, make
from .patterns import SKIP, Matcher, PatternError, Template, digit_template, hash_literals
from .rules import (
    Freeze,
    Init,
    Merge,
    Pattern,
    Policy,
    Prefix,
    Rename,
    Revision,
    Skip,
    Split,
    Statement,
    Strip,
    Transform,
    Unfreeze,
    quote,
    regex_literal,
)
from .span import Span

if TYPE_CHECKING:
    from .pipeline import Builder


@dataclass(frozen=True, eq=False)
class Rule:
    """One compiled statement: its number in the program, canonical text, span, matchers.

    `role` says where the program uses it: "pipeline" (source keys pass through it, in
    order), "init", "trainability" (freeze/unfreeze) or "policy".
    """

    id: int
    node: Statement
    matcher: Matcher | None = None
    template: Template | None = None
    matchers: tuple[Matcher, ...] = ()  # merge: one per source pattern
    templates: tuple[Template, ...] = ()  # split: one per target
    ops: tuple[Op, ...] = ()
    gather: str | None = None  # merge/split: the capture that numbers the pieces

    role: ClassVar[str] = "pipeline"

    @classmethod
    def build(cls, number: int, statement: Any, text: str | None) -> Rule:
        return cls(number, statement)

    @property
    def text(self) -> str:
        return self.node.to_text()

    @property
    def span(self) -> Span | None:
        return self.node.span

    def where(self) -> str:
        """`rename "a" -> "b" (rules.ckmap:3:1)`: the rule as people read it."""
        return f"{self.text} ({self.span})" if self.span else self.text

    def matches(self, name: str) -> bool:
        return self.matcher is not None and self.matcher.match(name) is not None

    def matches_source(self, key: str) -> bool:
        """Whether this pipeline rule would match `key` as the file names it."""
        return any(m.match(key) is not None for m in (self.matchers or (self.matcher,)) if m)

    # --- planning: a key rename by default (strip, prefix, rename, skip) ---

    def plan(self, builder: Builder) -> None:
        builder.rename(self)

    def step(self, name: str) -> Any:
        """A pipeline statement on one key: the new name, SKIP, or None when it does not match."""
        raise NotImplementedError

    def bucket_test(self) -> Any:
        """A test on templates (keys with digits as '#') that rules out buckets no key of
        which can match, or None. Digits in a pattern become '#' too: a key that matches
        the pattern has a template that matches the pattern so rewritten."""
        matchers = self.matchers or (self.matcher,)
        if any(m is None or m.is_regex for m in matchers):
            return None
        try:
            hashed = [Matcher(hash_literals(m.text)) for m in matchers]  # type: ignore[union-attr]
        except PatternError:
            return None
        return lambda t: any(m.match(t) is not None for m in hashed)

    def whole_buckets(self) -> bool:
        """Whether the rule decides whole buckets exactly (then `recipe` renames them)."""
        m = self.matcher
        return m is not None and not m.is_regex and not _has_digits(m.text)

    def recipe(self, template: str) -> Any:
        """How a bucket's keys change: parts (text, or (start, end) of the key), SKIP, or None
        when the rule does not match the bucket."""
        raise NotImplementedError


class StripRule(Rule):
    def step(self, name: str) -> Any:
        prefix = self.node.prefix  # type: ignore[attr-defined]
        return name[len(prefix) :] if name.startswith(prefix) else None

    def matches_source(self, key: str) -> bool:
        return key.startswith(self.node.prefix)  # type: ignore[attr-defined]

    def bucket_test(self) -> Any:
        text = digit_template(self.node.prefix)  # type: ignore[attr-defined]
        return lambda t: t.startswith(text)

    def whole_buckets(self) -> bool:
        return not _has_digits(self.node.prefix)  # type: ignore[attr-defined]

    def recipe(self, template: str) -> Any:
        prefix = self.node.prefix  # type: ignore[attr-defined]
        return [(len(prefix), None)] if template.startswith(prefix) else None


class PrefixRule(Rule):
    def step(self, name: str) -> Any:
        return self.node.prefix + name  # type: ignore[attr-defined]

    def matches_source(self, key: str) -> bool:
        return True

    def bucket_test(self) -> Any:
        return None

    def whole_buckets(self) -> bool:
        return True

    def recipe(self, template: str) -> Any:
        return [self.node.prefix, (0, None)]  # type: ignore[attr-defined]


class _PatternRule(Rule):
    """A statement with one pattern: its matcher, built once."""

    @classmethod
    def build(cls, number: int, statement: Any, text: str | None) -> Rule:
        return cls(number, statement, _matcher(statement.pattern, statement, text))


class RenameRule(_PatternRule):
    @classmethod
    def build(cls, number: int, statement: Any, text: str | None) -> Rule:
        matcher = _matcher(statement.pattern, statement, text)
        try:
            template = Template(statement.target)
        except PatternError as e:
            hint = _capture_hint(statement) if e.code == "CKM212" else None
            raise _target_error(e, statement, text, e.message, hint=hint) from None
        for name, offset in template.refs:
            if name not in matcher.names:
                bound = ", ".join(f"{{{n}}}" for n in sorted(matcher.names, key=_capture_order))
                raise _target_error(
                    PatternError("", offset),
                    statement,
                    text,
                    f"capture {{{name}}} is used in the target but the pattern never binds it",
                    code="CKM202",
                    hint=f"the pattern binds {bound}" if bound else "the pattern binds no captures",
                )
        return cls(number, statement, matcher, template)

    def step(self, name: str) -> Any:
        m = self.matcher.match(name)  # type: ignore[union-attr]
        if m is None:
            return None
        new = self.template.render(m.captures)  # type: ignore[union-attr]
        return new + m.rest if new else m.rest.removeprefix(".")

    def recipe(self, template: str) -> Any:
        found = self.matcher.spans(template)  # type: ignore[union-attr]
        if found is None:
            return None
        captures, rest = found
        parts: list = [p if isinstance(p, str) else captures[p[0]] for p in self.template.parts]  # type: ignore[union-attr]
        if rest is not None:
            empty = not any(parts)  # a rename to "" drops the matched segments and their dot
            parts.append((rest[0] + 1, rest[1]) if empty else rest)
        return parts


class SkipRule(_PatternRule):
    def step(self, name: str) -> Any:
        return SKIP if self.matcher.match(name) is not None else None  # type: ignore[union-attr]

    def recipe(self, template: str) -> Any:
        return SKIP if self.matcher.spans(template) is not None else None  # type: ignore[union-attr]


class TransformRule(Rule):
    @classmethod
    def build(cls, number: int, statement: Any, text: str | None) -> Rule:
        ops = _compile_ops(statement, text, ["one"] * len(statement.ops))
        return cls(number, statement, _matcher(statement.pattern, statement, text), ops=ops)

    def plan(self, builder: Builder) -> None:
        builder.transform(self)


class MergeRule(Rule):
    @classmethod
    def build(cls, number: int, statement: Any, text: str | None) -> Rule:
        ops = _compile_ops(statement, text, ["merge"] + ["one"] * (len(statement.ops) - 1))
        matchers = tuple(_matcher(p, statement, text) for p in statement.patterns)
        template = _target(statement.target, statement, text)
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
        return cls(number, statement, matchers=matchers, template=template, ops=ops, gather=gather)

    def plan(self, builder: Builder) -> None:
        builder.merge(self)


class SplitRule(Rule):
    @classmethod
    def build(cls, number: int, statement: Any, text: str | None) -> Rule:
        ops = _compile_ops(statement, text, ["one"] * (len(statement.ops) - 1) + ["split"])
        matcher = _matcher(statement.pattern, statement, text)
        templates = tuple(_target(t, statement, text) for t in statement.targets)
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
        return cls(number, statement, matcher=matcher, templates=templates, ops=ops, gather=gather)

    def plan(self, builder: Builder) -> None:
        builder.split(self)


class InitRule(_PatternRule):
    role = "init"

    def matches_source(self, key: str) -> bool:
        return False  # it speaks of final names


class FreezeRule(_PatternRule):
    role = "trainability"
    frozen: ClassVar[bool] = True

    def matches_source(self, key: str) -> bool:
        return False


class UnfreezeRule(FreezeRule):
    frozen = False


class PolicyRule(Rule):
    role = "policy"


class RevisionRule(Rule):
    """`revision "ID" from "P"`: says which step of a history this file is; plans nothing."""

    role = "revision"

    def matches_source(self, key: str) -> bool:
        return False


COMPILED: dict[type[Statement], type[Rule]] = {
    Strip: StripRule,
    Prefix: PrefixRule,
    Rename: RenameRule,
    Skip: SkipRule,
    Transform: TransformRule,
    Merge: MergeRule,
    Split: SplitRule,
    Init: InitRule,
    Freeze: FreezeRule,
    Unfreeze: UnfreezeRule,
    Policy: PolicyRule,
    Revision: RevisionRule,
}


def compile_rule(number: int, statement: Statement, text: str | None = None) -> Rule:
    """The compiled rule for one statement (includes are spliced before this)."""
    return COMPILED[type(statement)].build(number, statement, text)


def _has_digits(text: str) -> bool:
    return digit_template(text) != text or "#" in text


# --- building: matchers, targets, ops, each error at its rule's span ---------------------------


def _matcher(pattern: Pattern, statement: Statement, text: str | None) -> Matcher:
    try:
        return Matcher(pattern.text, pattern.regex)
    except PatternError as e:
        raise _pattern_error(e, pattern, statement, text) from None


def _target(target: str, statement: Statement, text: str | None) -> Template:
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


_KINDS = {
    "one": "one-to-one",
    "merge": "many-to-one",
    "split": "one-to-many",
    "fill": "a fill (it makes a tensor: `init ... | zeros()`)",
}


def _compile_ops(statement: Any, text: str | None, wanted: list[str]) -> tuple[Op, ...]:
    """The statement's ops, each of the kind its place needs (`wanted`, in order)."""
    ops = []
    for call in statement.ops:
        try:
            ops.append(make(call.name, call.args))
        except OpArgError as e:
            raise _error("CKM208", str(e), call.span or statement.span, text) from None
    for op, call, want in zip(ops, statement.ops, wanted, strict=True):
        if op.kind != want:
            raise _error(
                "CKM210",
                f"{op.name} is {_KINDS[op.kind]}; here {statement.keyword} needs {_KINDS[want]}",
                call.span or statement.span,
                text,
                hint=_OP_PLACES[statement.keyword],
            )
    return tuple(ops)


_OP_PLACES = {
    "transform": "many-to-one ops go in merge, one-to-many ops in split",
    "merge": "merge ... | cat(0) or | stack(0), then one-to-one ops",
    "split": "split ... | one-to-one ops, then split([...], dim) or unstack(dim) last",
}


def _capture_order(name: str) -> tuple[int, int | str]:
    return (0, int(name)) if name.isdigit() else (1, name)


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
