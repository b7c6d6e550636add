"""Errors: one base class, one subclass per phase, a stable code on each error.

Every error that knows where it comes from carries a `Span` and renders the
offending source line with a caret under the column, like a compiler.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from pydantic import BaseModel, ConfigDict


class Span(BaseModel):
    """Where a rule (or a piece of one) stands: file, 1-based line and column."""

    model_config = ConfigDict(frozen=True)

    file: str | None = None
    line: int
    column: int
    end_line: int | None = None
    end_column: int | None = None

    def __str__(self) -> str:
        return f"{self.file or '<rules>'}:{self.line}:{self.column}"


class CkptmapError(Exception):
    """Base class of every error ckptmap raises on purpose.

    `code` is stable (the CLI prints it, tests pin it); `span` says where in a
    rule file the problem is; `line_text` is that source line, for the caret.
    """

    code = "CKM000"
    phase = "error"

    def __init__(
        self,
        message: str,
        *,
        code: str | None = None,
        span: Span | None = None,
        line_text: str | None = None,
        hint: str | None = None,
        details: Sequence[str] = (),
    ):
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code
        self.span = span
        self.line_text = line_text
        self.hint = hint
        self.details = list(details)

    def __str__(self) -> str:
        return self.render()

    def render(self) -> str:
        """The message with its location, the source line and a caret under the column."""
        where = f"{self.span}: " if self.span else ""
        out = [f"{where}error[{self.code}]: {self.message}"]
        if self.span and self.line_text is not None:
            num = str(self.span.line)
            pad = " " * len(num)
            width = 1
            if self.span.end_line == self.span.line and self.span.end_column:
                width = max(1, self.span.end_column - self.span.column)
            text = self.line_text.rstrip("\n").expandtabs(1)
            out += [
                f"{pad} |",
                f"{num} | {text}",
                f"{pad} | {' ' * (self.span.column - 1)}{'^' * width}",
            ]
        out += [f"  {d}" for d in self.details]
        if self.hint:
            out.append(f"hint: {self.hint}")
        return "\n".join(out)


class UsageError(CkptmapError, TypeError, ValueError):
    """A public function called with an argument it cannot take: a wrong type, an unknown
    policy word. (Also a TypeError and a ValueError, as Python's own would be.)"""

    code = "CKM001"
    phase = "usage"


class RuleSyntaxError(CkptmapError):
    """A rule file (DSL, YAML or JSON) that cannot be read as rules."""

    code = "CKM100"
    phase = "syntax"


class RuleCompileError(CkptmapError):
    """Rules that read fine but cannot work: bad regex, unbound capture, include cycle…"""

    code = "CKM200"
    phase = "compile"


class PlanError(CkptmapError):
    """A plan that has problems under its policies (conflicts, mismatches, missing keys…)."""

    code = "CKM300"
    phase = "plan"

    def __init__(self, message: str, *, problems: Sequence[object] = (), **kwargs):
        super().__init__(message, **kwargs)
        self.problems = list(problems)


class LoadError(CkptmapError):
    """Executing a plan or loading into a model failed; the model is left untouched."""

    code = "CKM400"
    phase = "load"


class CheckpointError(CkptmapError):
    """A checkpoint file or folder that cannot be read or written safely."""

    code = "CKM500"
    phase = "file"


def summarize(lines: Iterable[str], limit: int = 20) -> list[str]:
    """At most `limit` lines, then '… and N more'."""
    lines = list(lines)
    if len(lines) <= limit:
        return lines
    return [*lines[:limit], f"… and {len(lines) - limit} more"]


def line_of(text: str | None, line: int) -> str | None:
    """The 1-based `line` of `text`, or None when there is no such line."""
    if text is None:
        return None
    lines = source_lines(text)
    return lines[line - 1] if 0 < line <= len(lines) else None


def source_lines(text: str) -> list[str]:
    """Rule text cut into lines as the grammar cuts it: at `\n` only (`str.splitlines` also
    breaks at form feeds, U+0085 and U+2028, which rule text may hold in a comment)."""
    lines = [line.removesuffix("\r") for line in text.split("\n")]
    if lines and lines[-1] == "":
        lines.pop()
    return lines
