"""Errors: one base class, one subclass per phase, a stable code on each error.

Every error that knows where it comes from carries a `Span` and renders the
offending source line with a caret under the column, like a compiler.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .span import Span


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
            column = self.span.column
            if len(text) > 160:  # a long line: the part around the column, not all of it
                start = max(0, column - 80)
                text = ("..." if start else "") + text[start : start + 160] + "..."
                column -= start - (3 if start else 0)
                width = min(width, 80)
            text = "".join(c if c.isprintable() else "?" for c in text)
            out += [
                f"{pad} |",
                f"{num} | {text}",
                f"{pad} | {' ' * (column - 1)}{'^' * width}",
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


class HistoryError(CkptmapError):
    """A revision history (a folder of step files) that cannot be used as asked: its graph,
    a step that does not hold, a checkpoint at another revision."""

    code = "CKM600"
    phase = "history"


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


# --- torch, where it is needed -------------------------------------------------------------

TORCH_HINT = (
    "pip install 'ckptmap[torch]' (for the CPU build, first: "
    "pip install torch --index-url https://download.pytorch.org/whl/cpu)"
)


def torch_missing(what: str) -> UsageError:
    """The one line said when torch is needed and absent: what needed it, how to add it."""
    return UsageError(
        f"{what} needs PyTorch, which is not installed (reading .pt files, tensor transforms, "
        "loading into a model and DCP do; check, fmt, inspect, plan, diff and renames of "
        "safetensors files do not)",
        code="CKM003",
        hint=TORCH_HINT,
    )


def is_torch_missing(e: BaseException) -> bool:
    return isinstance(e, ModuleNotFoundError) and (e.name or "").partition(".")[0] == "torch"


def needs_torch(what: str) -> Any:
    """Decorate a function that may need torch: without it, `torch_missing(what)`."""

    def wrap(fn: Any) -> Any:
        @functools.wraps(fn)
        def call(*args: Any, **kwargs: Any) -> Any:
            try:
                return fn(*args, **kwargs)
            except ModuleNotFoundError as e:
                if not is_torch_missing(e):
                    raise
                raise torch_missing(what) from None

        return call

    return wrap


# --- every code, in one place -----------------------------------------------------------------
# code -> (the class that carries it, what it means). docs/language.md's error table is made
# from this (docs/render_cli.py) and tests/test_errors.py checks that every code is raised
# somewhere and that nothing is raised with a code missing here.

CODES: dict[str, tuple[type[CkptmapError], str]] = {
    "CKM000": (CkptmapError, "any error of ckptmap (the base class's code)"),
    "CKM001": (
        UsageError,
        "a public function given an argument of the wrong type (also a `TypeError`)",
    ),
    "CKM002": (
        UsageError,
        'a per-call policy word that does not exist (`on_missing="skip"`; also a `ValueError`)',
    ),
    "CKM003": (
        UsageError,
        "what was asked needs PyTorch, which is not installed (the hint says how to add it)",
    ),
    "CKM100": (RuleSyntaxError, "rules that cannot be read (the class's code)"),
    "CKM101": (
        RuleSyntaxError,
        "unexpected text (the message says what was expected), or nesting too deep",
    ),
    "CKM102": (RuleSyntaxError, "`->` missing after a rename pattern"),
    "CKM103": (RuleSyntaxError, "unterminated string or regex, or an empty regex"),
    "CKM104": (RuleSyntaxError, "unknown statement (with a suggestion)"),
    "CKM105": (RuleSyntaxError, "bad word after `on`"),
    "CKM106": (RuleSyntaxError, "unsupported language version, or the header not first"),
    "CKM107": (RuleSyntaxError, "unknown escape in a string"),
    "CKM108": (
        RuleSyntaxError,
        "a statement with an invalid value (an empty `strip`, a YAML field, ops written as text)",
    ),
    "CKM110": (
        RuleSyntaxError,
        "not valid YAML (aliases included), or not the rule file structure",
    ),
    "CKM111": (RuleSyntaxError, "unknown rule file suffix"),
    "CKM112": (RuleSyntaxError, "a rule file that cannot be read"),
    "CKM113": (RuleSyntaxError, "`ckptmap:NAME` names no shipped rule file (the hint lists them)"),
    "CKM114": (
        RuleSyntaxError,
        "a `str` given as rules looks like a file name: pass a `pathlib.Path`",
    ),
    "CKM200": (RuleCompileError, "rules that cannot work (the class's code)"),
    "CKM201": (RuleCompileError, "invalid regex (at its position)"),
    "CKM202": (RuleCompileError, "a target uses a capture the pattern never binds"),
    "CKM203": (
        RuleCompileError,
        "malformed string pattern (empty segment, `**` inside a segment, `{1}`, a capture bound twice)",
    ),
    "CKM204": (RuleCompileError, "include cycle"),
    "CKM205": (RuleCompileError, "include reaching outside the including file's folder"),
    "CKM206": (RuleCompileError, "included file not found"),
    "CKM207": (RuleCompileError, "malformed target (unclosed `{`)"),
    "CKM208": (
        RuleCompileError,
        "unknown op (with a suggestion), wrong number or kind of op arguments, unknown dtype",
    ),
    "CKM210": (
        RuleCompileError,
        "an op of the wrong kind for its statement (`cat` in `transform`)",
    ),
    "CKM211": (RuleCompileError, "a merge whose captures cannot group its sources"),
    "CKM212": (
        RuleCompileError,
        "`*` in a target (the hint rewrites the rule with `{i}` captures)",
    ),
    "CKM213": (
        PlanError,
        "a regex that spent its time budget on some key (catastrophic backtracking)",
    ),
    "CKM214": (
        RuleCompileError,
        "a `revision` statement that is not the first of its own file (twice, or included)",
    ),
    "CKM300": (PlanError, "a plan with problems (the class's code)"),
    "CKM301": (PlanError, "two sources map to one target"),
    "CKM302": (PlanError, "shape mismatch (under `on mismatch error`)"),
    "CKM303": (PlanError, "missing target key (under `on missing error`, or a warning)"),
    "CKM304": (PlanError, "unexpected source key (under `on unexpected error`, or a warning)"),
    "CKM305": (PlanError, "the pipeline made an invalid name"),
    "CKM306": (PlanError, "an op that does not fit a tensor (key, shape, rule)"),
    "CKM307": (
        PlanError,
        "a merge with a member missing for some capture value, or two keys in one place",
    ),
    "CKM308": (PlanError, "a plan that cannot be reversed exactly (lossy steps, dropped sources)"),
    "CKM309": (
        PlanError,
        "a split whose pieces and target names differ in number, or that makes no piece",
    ),
    "CKM310": (
        PlanError,
        "a rule that matches no key (under `on unused error`, or a warning), with near misses",
    ),
    "CKM400": (LoadError, "executing a plan failed (the class's code)"),
    "CKM402": (LoadError, "the source is not the one the plan was made for (keys, shapes, dtypes)"),
    "CKM403": (LoadError, "a complex tensor into a real parameter"),
    "CKM404": (LoadError, "the model refused what the plan sent it; the model is as it was"),
    "CKM405": (
        LoadError,
        "loading failed in a module (named, with the tensor); the model is as it was",
    ),
    "CKM406": (
        LoadError,
        "sparse, quantized, meta or nested source tensors, refused before any write",
    ),
    "CKM407": (LoadError, "a tensor the plan would hold is larger than this machine's memory"),
    "CKM408": (LoadError, "a model on the meta device: nothing to load into"),
    "CKM409": (
        LoadError,
        "a sharded load from what cannot be read in pieces (a torch file), or a DTensor of "
        "several local pieces",
    ),
    "CKM410": (
        LoadError,
        "a sharded load or save that failed on one rank (said on every rank); the model is as "
        "it was",
    ),
    "CKM411": (LoadError, "a Plan given to LoadPlanner that was made for another checkpoint"),
    "CKM500": (CheckpointError, "a file that cannot be read or written safely (the class's code)"),
    "CKM600": (HistoryError, "a revision history that cannot be used as asked (the class's code)"),
    "CKM601": (HistoryError, "a history folder with no steps, or a step file without `revision`"),
    "CKM602": (
        HistoryError,
        "a history graph that is not one: a duplicate id, an unknown parent, a cycle, "
        "no base or two, two heads no merge joins",
    ),
    "CKM603": (
        HistoryError,
        "a step that does not hold against its parent's schema (plan problems, an unused "
        "rule, a result other than the child's schema)",
    ),
    "CKM604": (HistoryError, "a revision without a schema (a base, or a step that adds tensors)"),
    "CKM605": (
        HistoryError,
        "a checkpoint at another revision than the step needs, newer than head, or unknown",
    ),
    "CKM606": (
        HistoryError,
        "tensors a revision introduces with no fill and no model to take them from",
    ),
    "CKM607": (HistoryError, "no way between two revisions (upgrade to an older one, …)"),
    "CKM608": (HistoryError, "a new revision whose id or file is already taken"),
    "CKM501": (CheckpointError, "no such file, or it cannot be read"),
    "CKM502": (CheckpointError, "a folder with no index and no single model file"),
    "CKM503": (CheckpointError, "neither a safetensors file nor a torch checkpoint"),
    "CKM504": (CheckpointError, "a FIFO, socket or device given as a file"),
    "CKM510": (
        CheckpointError,
        "a safetensors file too short, or whose header length is impossible or over the limit",
    ),
    "CKM511": (
        CheckpointError,
        "a safetensors header that is not valid (JSON, dtypes, shapes, offsets, a name twice, aliases)",
    ),
    "CKM512": (
        CheckpointError,
        "more tensors, or a longer name, than the limits allow (`CKPTMAP_MAX_*`)",
    ),
    "CKM513": (CheckpointError, "a shard index that is not valid JSON or has no `weight_map`"),
    "CKM514": (CheckpointError, "a shard index pointing outside its folder"),
    "CKM515": (CheckpointError, "a shard index naming a missing or unusable file"),
    "CKM520": (CheckpointError, "a torch file that torch cannot load"),
    "CKM521": (
        CheckpointError,
        "a torch pickle that is not weights-only (refused; nothing in it runs)",
    ),
    "CKM523": (CheckpointError, "`--select` naming nothing, or no tensors in the checkpoint"),
    "CKM524": (CheckpointError, "several sets of weights in a checkpoint: choose with `--select`"),
    "CKM525": (CheckpointError, "a `.pt` storage record whose size differs from its tensors'"),
    "CKM526": (
        CheckpointError,
        "a torch.distributed.checkpoint folder that DCP's own reader refuses",
    ),
    "CKM530": (
        CheckpointError,
        "a write path that reaches a read path (through symlinks and hard links too)",
    ),
    "CKM531": (
        CheckpointError,
        "a destination that cannot be (a folder, a missing folder, a wrong suffix)",
    ),
    "CKM532": (CheckpointError, "a destination that cannot be written (permissions, no space)"),
    "CKM533": (CheckpointError, "an output or report that exists, without `--overwrite`"),
    "CKM534": (CheckpointError, "a tensor's bytes in the file do not match its size"),
    "CKM535": (CheckpointError, "`--max-shard-size` that is not a size"),
    "CKM536": (CheckpointError, "a source cut short while it was copied"),
    "CKM540": (CheckpointError, "a `--target` JSON file that is not `{name: [shape]}`"),
    "CKM541": (
        CheckpointError,
        "a `--target` factory that cannot be imported or called, or returns no module",
    ),
    "CKM542": (
        CheckpointError,
        "a saved plan that is not a plan, or whose content does not match its fingerprint",
    ),
}


def error_table() -> str:
    """The markdown table of every code (docs/language.md holds a copy of it)."""
    rows = ["| code | class | meaning |", "| --- | --- | --- |"]
    rows += [f"| {code} | `{cls.__name__}` | {meaning} |" for code, (cls, meaning) in CODES.items()]
    return "\n".join(rows) + "\n"


def __getattr__(name: str) -> Any:
    """`Span` lives in span.py (a pydantic model): importing the errors costs no pydantic."""
    if name == "Span":
        from .span import Span

        return Span
    raise AttributeError(f"module 'ckptmap.errors' has no attribute {name!r}")
