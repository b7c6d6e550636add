"""Front ends: rule text (Lark grammar) and YAML/JSON, both to the same IR.

The grammar lives in `grammar/ckptmap.lark`; one Transformer turns Lark's
tree into `ckptmap.rules` nodes, each with its span. Lark's own errors are
translated into messages that name the likely mistake.
"""

from __future__ import annotations

import difflib
import functools
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lark import Lark, Token, Transformer, v_args
from lark.exceptions import UnexpectedCharacters, UnexpectedEOF, UnexpectedInput, VisitError
from pydantic import ValidationError

from .errors import CkptmapError, RuleSyntaxError, UsageError, line_of, source_lines
from .limits import check_text_size
from .rules import (
    ACTIONS,
    FORMS,
    PROBLEMS,
    STATEMENTS,
    UNESCAPES,
    Freeze,
    Include,
    Init,
    Merge,
    OpCall,
    Pattern,
    Policy,
    Prefix,
    Rename,
    Revision,
    RulesDocument,
    Ruleset,
    Skip,
    Split,
    Strip,
    Transform,
    Unfreeze,
    statement_from_form,
)
from .shipped import SHIPPED_PREFIX, shipped_file, shipped_rule_file
from .span import Span

if TYPE_CHECKING:
    import yaml

KEYWORDS = ("ckptmap", *STATEMENTS, "optional")
_STRING = re.compile(r'"([^"\\\n]|\\[^\n])*"')
RULE_SUFFIXES = {".ckmap": "dsl", ".yaml": "yaml", ".yml": "yaml", ".json": "yaml"}


def grammar_text() -> str:
    """The grammar shipped in the package (or, in a source checkout, at the repo root)."""
    return shipped_file("grammar", "ckptmap.lark").read_text(encoding="utf-8")


@functools.cache
def _parser() -> Lark:
    """The LALR parser. Building its tables takes a tenth of a second, every process:
    they are kept in the user's cache folder, keyed by the grammar and lark's version,
    and rebuilt whenever that file is missing, foreign or unreadable."""
    import hashlib

    import lark

    text = grammar_text()
    options = {"parser": "lalr", "propagate_positions": True, "maybe_placeholders": False}
    key = hashlib.sha256(f"{lark.__version__}\n{sorted(options.items())}\n{text}".encode())
    cached = _cache_folder()
    path = cached / f"grammar-{key.hexdigest()[:24]}.lark" if cached else None
    if path is not None and path.is_file():
        try:
            with open(path, "rb") as f:
                return Lark.load(f)
        except Exception:  # cut short, or from another lark: built again below
            pass
    parser = Lark(text, **options)
    if path is not None:
        _save_parser(parser, path)
    return parser


def _cache_folder() -> Path | None:
    """`$CKPTMAP_CACHE`, else `$XDG_CACHE_HOME/ckptmap`, else `~/.cache/ckptmap`: a folder
    only this user can write (what is loaded from it is trusted); None when there is none."""
    import os

    base = os.environ.get("CKPTMAP_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"),
        "ckptmap",
    )
    folder = Path(base)
    try:
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        info = folder.stat()
    except OSError:
        return None
    if hasattr(os, "getuid") and (info.st_uid != os.getuid() or info.st_mode & 0o022):
        return None  # someone else could have written what would be loaded
    return folder


def _save_parser(parser: Lark, path: Path) -> None:
    """Written beside its place, then moved in: a reader never sees half a file."""
    import os
    import tempfile

    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
        with open(fd, "wb") as f:
            parser.save(f)
        os.replace(tmp, path)
    except OSError:  # no cache, then: the next process builds the tables again
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)


# --- DSL ---------------------------------------------------------------------------------


def parse(text: str, path: str | Path | None = None) -> Ruleset:
    """Parse rule text into a `Ruleset`; raises `RuleSyntaxError` with line and column."""
    if not isinstance(text, str):
        raise UsageError(
            f"parse takes rule text (a str), not {type(text).__name__}",
            hint="ckptmap.load_rules(path) reads a file",
        )
    file = str(path) if path is not None else None
    if not text.strip():  # no rules (a plain load): no parser to build
        return Ruleset(file=file, text=text)
    try:
        tree = _parser().parse(text)
    except UnexpectedInput as e:
        if path is None and _looks_like_a_file_name(text):
            raise RuleSyntaxError(
                f"{text.strip()!r} looks like a file name, but rules given as a str are rule text",
                code="CKM114",
                hint=f"pass a pathlib.Path to read a file: Path({text.strip()!r})",
            ) from None
        raise _explain(e, text, file) from None
    except RecursionError:
        raise RuleSyntaxError(f"{file or '<rules>'}: nests too deeply", code="CKM101") from None
    try:
        return _ToIR(text, file).transform(tree)
    except VisitError as e:
        if isinstance(e.orig_exc, CkptmapError):
            raise e.orig_exc from None
        if isinstance(e.orig_exc, RecursionError):
            raise RuleSyntaxError(f"{file or '<rules>'}: nests too deeply", code="CKM101") from None
        raise
    except RecursionError:
        raise RuleSyntaxError(f"{file or '<rules>'}: nests too deeply", code="CKM101") from None


_EXPECTED = {
    "STRING": 'a quoted string ("...")',
    "NUMBER": "a number",
    "VBAR": "`|` and an op",
    "LPAR": "`(`",
    "RPAR": "`)`",
    "COMMA": "`,`",
    "LSQB": "`[`",
    "RSQB": "`]`",
    "REGEX": "a /regex/",
    "ARROW": "`->`",
    "WORD": "a word",
    "INT": "a number",
    "_NL": "the end of the line",
    "$END": "the end of the file",
}


def _looks_like_a_file_name(text: str) -> bool:
    name = text.strip()
    return "\n" not in name and (
        name.startswith(SHIPPED_PREFIX) or Path(name).suffix.lower() in RULE_SUFFIXES
    )


def _describe(token: Token) -> str:
    if token.type == "$END":
        return "end of file"
    if token.type == "_NL":
        return "end of line"
    return f"{token.value!r}"


def _explain(e: UnexpectedInput, text: str, file: str | None) -> RuleSyntaxError:
    """Turn Lark's error into one that names the likely mistake."""
    line = getattr(e, "line", None) or 1
    column = getattr(e, "column", None) or 1
    token = getattr(e, "token", None)
    at_end = isinstance(e, UnexpectedEOF) or getattr(token, "type", None) == "$END"
    if at_end or line < 1:
        lines = source_lines(text) or [""]
        line, column = len(lines), len(lines[-1]) + 1
    line_text = line_of(text, line) or ""
    span = Span(file=file, line=line, column=column)
    before = line_text[: column - 1]
    rest = line_text[column - 1 :]
    expected = set(getattr(e, "expected", None) or getattr(e, "allowed", None) or ())

    def error(code: str, message: str, hint: str | None = None) -> RuleSyntaxError:
        return RuleSyntaxError(message, code=code, span=span, line_text=line_text, hint=hint)

    at_statement_start = not before.strip()
    word = rest.split(maxsplit=1)[0] if rest.strip() else ""
    if at_statement_start and word and word[0].isalpha():
        bare = word.rstrip(":")
        if bare == "ckptmap":
            return error("CKM106", "the header `ckptmap 1` must come before every statement")
        if bare not in KEYWORDS:
            close = difflib.get_close_matches(bare, KEYWORDS, n=1)
            return error(
                "CKM104",
                f"unknown statement {bare!r}",
                f"did you mean {close[0]!r}?"
                if close
                else "statements: " + ", ".join(KEYWORDS[1:]),
            )
    if rest.startswith('"') and not _STRING.match(rest):
        return error("CKM103", "unterminated string: no closing quote on this line")
    if rest.startswith("/") and ({"REGEX"} & expected or isinstance(e, UnexpectedCharacters)):
        if rest.startswith("//"):
            return error("CKM103", "empty regex: write a pattern between the slashes")
        return error("CKM103", "unterminated regex: no closing slash on this line")
    if "ARROW" in expected:
        examples = {
            "merge": 'merge "a.q", "a.k" -> "a.qk" | cat(0)',
            "split": 'split "a.qk" -> "a.q", "a.k" | split([4, 4], 0)',
        }
        first = line_text.split(maxsplit=1)[0] if line_text.strip() else ""
        return error(
            "CKM102",
            "expected `->` after the pattern",
            examples.get(first, 'rename "old" -> "new"'),
        )
    if at_statement_start and expected - {"_NL", "$END"}:
        return error(
            "CKM101", "expected a statement here", "statements: " + ", ".join(KEYWORDS[1:])
        )
    found = _describe(token) if isinstance(token, Token) else repr(rest[:1] or "end of line")
    wanted = sorted(_EXPECTED.get(t, t) for t in expected if not t.startswith("__"))
    if {"_NL", "$END"} & expected and not ({"STRING", "REGEX", "WORD", "INT"} & expected):
        return error(
            "CKM101", f"unexpected {found}: this statement is complete", "one statement a line"
        )
    if not wanted:
        return error("CKM101", f"unexpected {found}")
    return error("CKM101", f"unexpected {found}; expected {' or '.join(wanted)}")


@v_args(meta=True, inline=True)
class _ToIR(Transformer):
    """Lark tree -> IR nodes, each with its span."""

    def __init__(self, text: str, file: str | None):
        super().__init__()
        self.text = text
        self.file = file

    # helpers ------------------------------------------------------------------------
    def _span(self, meta_or_token: Any) -> Span:
        m = meta_or_token
        return Span(
            file=self.file,
            line=m.line,
            column=m.column,
            end_line=m.end_line,
            end_column=m.end_column,
        )

    def _error(self, code: str, message: str, at: Any, hint: str | None = None) -> RuleSyntaxError:
        span = self._span(at)
        return RuleSyntaxError(
            message, code=code, span=span, line_text=line_of(self.text, span.line), hint=hint
        )

    def _string(self, token: Token) -> str:
        body, out, i = token.value[1:-1], [], 0
        while i < len(body):
            ch = body[i]
            if ch == "\\":
                esc = body[i + 1]
                if esc not in UNESCAPES:
                    line, column = token.line or 1, token.column or 1  # a parsed token has both
                    bad = Span(file=self.file, line=line, column=column + 1 + i)
                    raise RuleSyntaxError(
                        f"unknown escape '\\{esc}' in a string",
                        code="CKM107",
                        span=bad,
                        line_text=line_of(self.text, line),
                        hint='strings know \\" \\\\ \\n \\t \\r',
                    )
                out.append(UNESCAPES[esc])
                i += 2
            else:
                out.append(ch)
                i += 1
        return "".join(out)

    def _node(self, cls: type, meta: Any, *args: Any) -> Any:
        try:
            return cls(*args, span=self._span(meta))
        except RuleSyntaxError as e:  # the node refused its fields: say where
            raise self._error(e.code, e.message, meta) from None

    # rules ----------------------------------------------------------------------------
    def start(self, meta: Any, *items: Any) -> Ruleset:
        version, rules = 1, []
        for item in items:
            if isinstance(item, tuple):
                version = item[0]
            else:
                rules.append(item)
        return Ruleset(rules=tuple(rules), version=version, file=self.file, text=self.text)

    def header(self, meta: Any, number: Token) -> tuple[int]:
        if number.value != "1":
            shown = number.value if len(number.value) < 20 else number.value[:17] + "..."
            raise self._error(
                "CKM106", f"unsupported language version {shown} (this ckptmap reads 1)", number
            )
        return (1,)

    def pattern(self, meta: Any, token: Token) -> Pattern:
        span = self._span(token)
        if token.type == "REGEX":
            return Pattern(_unescape_regex(token.value[1:-1]), True, span=span)
        return Pattern(self._string(token), span=span)

    def optional(self, meta: Any, statement: Any) -> Any:
        return type(statement)(**{**dict(statement), "optional": True, "span": self._span(meta)})

    def strip(self, meta: Any, s: Token) -> Strip:
        return self._node(Strip, meta, self._string(s))

    def prefix(self, meta: Any, s: Token) -> Prefix:
        return self._node(Prefix, meta, self._string(s))

    def rename(self, meta: Any, pattern: Pattern, _arrow: Token, target: Token) -> Rename:
        return self._node(Rename, meta, pattern, self._string(target))

    def skip(self, meta: Any, pattern: Pattern) -> Skip:
        return self._node(Skip, meta, pattern)

    def init(self, meta: Any, pattern: Pattern, fill: OpCall | None = None) -> Init:
        return self._node(Init, meta, pattern, fill)

    def revision(self, meta: Any, id_: Token, *parents: Token) -> Revision:
        return self._node(
            Revision, meta, self._string(id_), tuple(self._string(p) for p in parents)
        )

    def freeze(self, meta: Any, pattern: Pattern) -> Freeze:
        return self._node(Freeze, meta, pattern)

    def unfreeze(self, meta: Any, pattern: Pattern) -> Unfreeze:
        return self._node(Unfreeze, meta, pattern)

    def transform_statement(self, meta: Any, pattern: Pattern, *ops: OpCall) -> Transform:
        return self._node(Transform, meta, pattern, ops)

    def merge(self, meta: Any, *items: Any) -> Merge:
        arrow = next(i for i, x in enumerate(items) if isinstance(x, Token) and x.type == "ARROW")
        patterns, target, ops = items[:arrow], items[arrow + 1], items[arrow + 2 :]
        return self._node(Merge, meta, patterns, self._string(target), ops)

    def split(self, meta: Any, pattern: Pattern, _arrow: Token, *items: Any) -> Split:
        targets = [self._string(t) for t in items if isinstance(t, Token)]
        ops = [o for o in items if isinstance(o, OpCall)]
        return self._node(Split, meta, pattern, tuple(targets), tuple(ops))

    def op(self, meta: Any, name: Token, *args: Any) -> OpCall:
        try:
            return OpCall(name.value, args, span=self._span(meta))
        except RuleSyntaxError as e:
            raise self._error(e.code, e.message, meta) from None

    def number(self, meta: Any, token: Token) -> int | float:
        text = token.value
        if len(text) > 40:  # no op takes such a number; int() of thousands of digits refuses
            raise self._error("CKM108", f"a number of {len(text)} digits", token)
        return float(text) if any(c in text for c in ".eE") else int(text)

    def word(self, meta: Any, token: Token) -> str:
        return token.value

    def list(self, meta: Any, *items: Any) -> tuple:
        return tuple(items)

    def include(self, meta: Any, path: Token) -> Include:
        return self._node(Include, meta, self._string(path))

    def policy(self, meta: Any, problem: Token, action: Token) -> Policy:
        if problem.value not in PROBLEMS:
            close = difflib.get_close_matches(problem.value, PROBLEMS, n=1)
            raise self._error(
                "CKM105",
                f"unknown problem {problem.value!r} after 'on'",
                problem,
                f"did you mean {close[0]!r}?" if close else "on mismatch | missing | unexpected",
            )
        allowed = ACTIONS[problem.value]
        if action.value not in allowed:
            raise self._error(
                "CKM105",
                f"'on {problem.value}' takes {' | '.join(allowed)}, not {action.value!r}",
                action,
            )
        return Policy(problem.value, action.value, span=self._span(meta))


def _unescape_regex(body: str) -> str:
    """`\\/` in a regex literal is a plain slash; every other escape is the regex's own."""
    out, i = [], 0
    while i < len(body):
        if body[i] == "\\" and i + 1 < len(body):
            out.append("/" if body[i + 1] == "/" else body[i : i + 2])
            i += 2
        else:
            out.append(body[i])
            i += 1
    return "".join(out)


# --- YAML / JSON -------------------------------------------------------------------------


@functools.cache
def _no_alias_loader() -> Any:
    """PyYAML's safe loader without aliases: `*name` can expand a 300-byte file into
    gigabytes ("billion laughs"), and a rule file never needs one. Made on first use: a
    command that reads no YAML never imports it."""
    import yaml

    class NoAliasLoader(yaml.SafeLoader):
        def compose_node(self, parent: Any, index: Any) -> Any:
            if self.check_event(yaml.AliasEvent):
                event = self.get_event()
                raise yaml.composer.ComposerError(
                    None, None, "aliases (*name) are not allowed in rule files", event.start_mark
                )
            return super().compose_node(parent, index)

    return NoAliasLoader


def _read_yaml(text: str, error: Any) -> tuple[Any, Any]:
    """The YAML document's root node and its data, every PyYAML error said as a rule
    file's."""
    import yaml

    loader = None
    try:
        loader = _no_alias_loader()(text)
        root = loader.get_single_node()
        return root, loader.construct_document(root) if root is not None else None
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        raise error("CKM110", f"not valid YAML: {e.problem or e.context}", mark) from None
    except yaml.YAMLError as e:
        raise RuleSyntaxError(f"not valid YAML: {e}", code="CKM110") from None
    except RecursionError:
        raise RuleSyntaxError("not a rule file: it nests too deeply", code="CKM110") from None
    except ValueError as e:  # a value YAML reads but Python refuses (a 5,000-digit integer)
        raise RuleSyntaxError(f"not a rule file: {str(e)[:200]}", code="CKM110") from None
    finally:
        if loader is not None:
            loader.dispose()


def parse_yaml(text: str, path: str | Path | None = None) -> Ruleset:
    """Read the YAML (or JSON) form of a rule file into the same IR as the DSL."""
    import yaml  # here, not at the top: a command that reads no YAML never imports it

    file = str(path) if path is not None else None

    def span_of(node: yaml.Node | yaml.Mark) -> Span:
        mark = node.start_mark if isinstance(node, yaml.Node) else node
        return Span(file=file, line=mark.line + 1, column=mark.column + 1)

    def error(code: str, message: str, at: yaml.Node | yaml.Mark | None, hint: str | None = None):
        if at is None:  # PyYAML gives a mark with every error it raises; this is a safety net
            return RuleSyntaxError(message, code=code, hint=hint)
        span = span_of(at)
        return RuleSyntaxError(
            message, code=code, span=span, line_text=line_of(text, span.line), hint=hint
        )

    root, data = _read_yaml(text, error)
    if root is None or data is None:
        return Ruleset(file=file)
    if not isinstance(data, dict):
        raise error(
            "CKM110", "a rule file is a mapping with `rules:` (and optionally `ckptmap: 1`)", root
        )
    try:
        doc = RulesDocument.model_validate(data)
    except ValidationError as e:
        err = e.errors()[0]
        where = ".".join(str(p) for p in err["loc"])
        raise error("CKM110", f"{where}: {err['msg']}", root) from None

    items = _value_node(root, "rules")
    if items is not None and not isinstance(items, yaml.SequenceNode) and doc.rules:
        raise error("CKM110", "`rules:` is a list of statements", items)
    rules = []
    for item, node in zip(doc.rules, items.value if items else [], strict=False):
        keys = [k for k in item if k not in _BESIDE] if isinstance(item, dict) else []
        if len(keys) != 1:
            raise error(
                "CKM110",
                "each rule is a mapping with exactly one statement key (and `optional: true`)",
                node,
            )
        key = keys[0]
        if key is True:  # YAML 1.1 reads a bare `on` as the boolean true
            raise error("CKM104", "`on:` reads as true in YAML", node, "write on_missing: warn")
        if key not in FORMS:
            close = difflib.get_close_matches(str(key), list(FORMS), n=1)
            hint = f"did you mean {close[0]!r}?" if close else "statements: " + ", ".join(FORMS)
            raise error("CKM104", f"unknown statement {key!r}", node, hint)
        try:
            form = FORMS[key].model_validate(item)
        except ValidationError as e:
            err = e.errors()[0]
            where = ".".join(str(p) for p in err["loc"])
            message = err["msg"].removeprefix("Value error, ")
            raise error("CKM108", f"invalid {key} statement ({where}): {message}", node) from None
        try:
            rules.append(statement_from_form(key, form, span_of(node)))
        except (RuleSyntaxError, ValueError) as e:
            message = e.message if isinstance(e, RuleSyntaxError) else f"invalid {key}: {e}"
            raise error("CKM108", message, node) from None
    return Ruleset(rules=tuple(rules), version=doc.ckptmap, file=file, text=text)


# keys that stand beside a statement's own key: `optional: true`, a revision's `from:`,
# an init's `fill:` (each statement's form says which it takes)
_BESIDE = frozenset({"optional", "from", "fill"})


def _value_node(mapping: yaml.Node, key: str) -> yaml.Node | None:
    import yaml

    if isinstance(mapping, yaml.MappingNode):
        for k, v in mapping.value:
            if getattr(k, "value", None) == key:
                return v
    return None


# --- files -------------------------------------------------------------------------------


def load_rules(path: str | Path) -> Ruleset:
    """Read a rule file: `.ckmap` (DSL), `.yaml`/`.yml` or `.json`, chosen by suffix.

    `ckptmap:NAME` names a rule file that ships with ckptmap (`ckptmap rules` lists them).
    """
    if not isinstance(path, (str, Path)):
        raise UsageError(f"load_rules takes a file path, not {type(path).__name__}")
    if str(path).startswith(SHIPPED_PREFIX):
        shipped = shipped_rule_file(str(path))  # named as the user named it, in spans too
        return parse(shipped.read_text(encoding="utf-8"), str(path))
    path = Path(path)
    kind = RULE_SUFFIXES.get(path.suffix.lower())
    if kind is None:
        raise RuleSyntaxError(
            f"{path}: unknown rule file type {path.suffix or '(no suffix)'!r}",
            code="CKM111",
            hint="use .ckmap, .yaml, .yml or .json",
        )
    from .io import refuse_special  # the readers load on first use: `import ckptmap` stays light

    refuse_special(path, RuleSyntaxError)
    check_text_size(path, RuleSyntaxError, "CKM112")
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise RuleSyntaxError(f"{path}: rule file not found", code="CKM112") from None
    except IsADirectoryError:
        raise RuleSyntaxError(f"{path}: is a directory, not a rule file", code="CKM112") from None
    except UnicodeDecodeError as e:
        raise RuleSyntaxError(f"{path}: not UTF-8 text ({e.reason})", code="CKM112") from None
    except OSError as e:
        raise RuleSyntaxError(f"{path}: cannot read ({e.strerror})", code="CKM112") from None
    return parse(text, path) if kind == "dsl" else parse_yaml(text, path)


# --- formatting ----------------------------------------------------------------------------

_HEADER = re.compile(r"\s*ckptmap\s+\d+\s*(#.*)?$")


def format_text(text: str, path: str | Path | None = None) -> str:
    """Canonical layout of rule text, keeping comments: what `ckptmap fmt` writes.

    Each statement is reprinted canonically with its trailing comment; comment
    lines stay where they are; runs of blank lines shrink to one; the header
    `ckptmap 1` comes first.
    """
    ruleset = parse(text, path)
    by_line = {rule.span.line: (rule, rule.span) for rule in ruleset.rules if rule.span}
    lines = source_lines(text)
    first = min(by_line, default=len(lines) + 1)
    header = next((n for n, ln in enumerate(lines[: first - 1], 1) if _HEADER.match(ln)), 0)
    out: list[str] = []
    for number, line in enumerate(lines, start=1):
        stripped = line.strip()
        if number == header or (not header and number == first):
            if out and out[-1] != "":
                out.append("")
            comment = stripped.split("#", 1)[1].strip() if header and "#" in stripped else ""
            out += [f"ckptmap {ruleset.version}" + (f"  # {comment}" if comment else ""), ""]
            if number == header:
                continue
        if number in by_line:
            rule, span = by_line[number]
            end = span.end_column or len(line) + 1  # parsed statements always have it
            comment = line[end - 1 :].strip()
            out.append(rule.to_text() + (f"  {comment}" if comment else ""))
        elif stripped.startswith("#"):
            out.append(stripped)
        elif not stripped and out and out[-1] != "":
            out.append("")
    if not header and not by_line:
        out += ["", f"ckptmap {ruleset.version}"]
    while out and out[0] == "":
        out.pop(0)
    while out and out[-1] == "":
        out.pop()
    return "\n".join(out) + "\n"
