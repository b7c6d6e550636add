"""The rule IR: frozen pydantic nodes that the DSL, YAML and Python all build.

Every node carries its `span` (where it was written). Spans, like the path of
the file a ruleset came from, take no part in equality: two rulesets are equal
when they say the same thing.

    >>> from ckptmap.rules import Ruleset, Strip, Rename, Init
    >>> rs = Ruleset([Strip("module."), Rename("features", "backbone"), Init("fc")])
    >>> print(rs.to_text())
    ckptmap 1
    <BLANKLINE>
    strip "module."
    rename "features" -> "backbone"
    init "fc"
    <BLANKLINE>
"""

from __future__ import annotations

import contextlib
import functools
import re
from typing import Annotated, Any, ClassVar, Literal, get_args

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from .errors import RuleSyntaxError, UsageError
from .span import Span

LANGUAGE_VERSION = 1

# Fields that say where a node came from, not what it means.
_NOT_COMPARED = frozenset({"span", "file", "text"})


class Node(BaseModel):
    """Base of every IR node: immutable, positional arguments allowed, span-blind equality.

    Each concrete node repeats `__init__ = Node.__init__`: type checkers give
    every pydantic model a keyword-only constructor of its own unless the class
    names its `__init__`, and the nodes take their leading fields positionally.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")
    _positional: ClassVar[tuple[str, ...]] = ()

    span: Span | None = Field(default=None, exclude=True, repr=False)

    def __init__(self, *args: Any, **data: Any):
        if len(args) > len(self._positional):
            raise UsageError(
                f"{type(self).__name__} takes at most {len(self._positional)} positional arguments"
            )
        data.update(zip(self._positional, args, strict=False))
        try:
            super().__init__(**data)
        except ValidationError as e:  # every error ckptmap raises is a CkptmapError
            raise invalid_node(type(self), e) from None

    def _key(self) -> tuple:
        return tuple(
            (name, getattr(self, name))
            for name in type(self).model_fields
            if name not in _NOT_COMPARED
        )

    def __eq__(self, other: object) -> bool:
        return type(self) is type(other) and self._key() == other._key()

    def __hash__(self) -> int:
        return hash((type(self).__name__, self._key()))


def invalid_node(cls: type, e: ValidationError) -> RuleSyntaxError:
    """A pydantic error on building an IR node, as one `RuleSyntaxError` naming the field."""
    err = e.errors()[0]
    message = err["msg"].removeprefix("Value error, ")
    # pydantic's own steps ("function-after[...]", union members) are no help to a reader
    field = ".".join(str(p) for p in err["loc"] if not any(c in str(p) for c in "[("))
    if field and err["type"] != "value_error":
        message = f"{field}: {message}"
    what = getattr(cls, "keyword", None)
    what = f"{what} statement" if what else {"OpCall": "op"}.get(cls.__name__, cls.__name__.lower())
    return RuleSyntaxError(f"invalid {what}: {message}", code="CKM108")


class Pattern(Node):
    """A key pattern: a string pattern (segments, `*`, `**`, `{name}`) or a `/regex/`."""

    __init__ = Node.__init__  # positional arguments: see Node

    _positional = ("text", "regex")

    text: str
    regex: bool = False

    @field_validator("text")
    @classmethod
    def _not_empty(cls, text: str) -> str:
        if not text:
            raise ValueError("a pattern cannot be empty")
        return text

    @model_validator(mode="after")
    def _regex_printable(self) -> Pattern:
        if self.regex:
            if "\n" in self.text or "\r" in self.text:
                raise ValueError("a regex cannot contain a line break (write \\n)")
            if _ends_in_lone_backslash(self.text):
                raise ValueError("a regex cannot end with a lone backslash")
        return self

    def to_text(self) -> str:
        return regex_literal(self.text) if self.regex else quote(self.text)

    def to_yaml(self) -> Any:
        return {"regex": self.text} if self.regex else self.text


def regex(text: str) -> Pattern:
    """A regex pattern for Python-built rules: `Rename(regex(r"blk_(\\d+)\\.(.*)"), "blocks.{1}.{2}")`."""
    return Pattern(text, True)


def _as_pattern(value: Any) -> Any:
    return Pattern(value) if isinstance(value, str) else value


class Statement(Node):
    """One line of a rule file.

    `optional` marks a rule that may match nothing (a wrapper prefix that only
    some checkpoints have): it is never an unused-rule problem. Written
    `optional strip "module."`, or `optional: true` beside the statement in YAML.
    """

    __init__ = Node.__init__  # positional arguments: see Node

    keyword: ClassVar[str]
    optionable: ClassVar[bool] = True  # whether `optional` makes sense for this statement

    optional: bool = False

    @model_validator(mode="after")
    def _optional_fits(self) -> Statement:
        if self.optional and not self.optionable:
            raise ValueError(f"{self.keyword} cannot be optional: it never matches nothing")
        return self

    def to_text(self) -> str:
        return ("optional " if self.optional else "") + self._text()

    def to_yaml(self) -> dict[str, Any]:
        doc = self._yaml()
        return {**doc, "optional": True} if self.optional else doc

    def _text(self) -> str:
        raise NotImplementedError

    def _yaml(self) -> dict[str, Any]:
        raise NotImplementedError


class _LiteralStatement(Statement):
    """`strip "module."`, `prefix "encoder."`: a literal string at the start of the key."""

    _positional: ClassVar[tuple[str, ...]] = ("prefix",)
    prefix: str

    @field_validator("prefix")
    @classmethod
    def _not_empty(cls, prefix: str) -> str:
        if not prefix:
            raise ValueError(f"{cls.keyword} needs a non-empty string")
        return prefix

    def _text(self) -> str:
        return f"{self.keyword} {quote(self.prefix)}"

    def _yaml(self) -> dict[str, Any]:
        return {self.keyword: self.prefix}


class Strip(_LiteralStatement):
    """Remove `prefix` from a key that starts with it (`strip "module."`)."""

    __init__ = Node.__init__  # positional arguments: see Node

    keyword = "strip"


class Prefix(_LiteralStatement):
    """Prepend `prefix` to every key (`prefix "encoder."`)."""

    __init__ = Node.__init__  # positional arguments: see Node

    keyword = "prefix"
    optionable = False


class _PatternStatement(Statement):
    _positional: ClassVar[tuple[str, ...]] = ("pattern",)
    pattern: Pattern

    @field_validator("pattern", mode="before")
    @classmethod
    def _coerce(cls, value: Any) -> Any:
        return _as_pattern(value)

    def _text(self) -> str:
        return f"{self.keyword} {self.pattern.to_text()}"

    def _yaml(self) -> dict[str, Any]:
        return {self.keyword: self.pattern.to_yaml()}


class Rename(_PatternStatement):
    """`rename "features" -> "backbone"`; with a regex, `target` is the whole new key."""

    __init__ = Node.__init__  # positional arguments: see Node

    keyword = "rename"
    _positional = ("pattern", "target")
    target: str

    def _text(self) -> str:
        return f"rename {self.pattern.to_text()} -> {quote(self.target)}"

    def _yaml(self) -> dict[str, Any]:
        return {"rename": {"from": self.pattern.to_yaml(), "to": self.target}}


class Skip(_PatternStatement):
    """Drop matching source keys (pipeline statement)."""

    __init__ = Node.__init__  # positional arguments: see Node

    keyword = "skip"


class Init(_PatternStatement):
    """Matching target keys keep their fresh initialization; sources mapped there are skipped.

    `fill` (`init "layers.3" | normal(0, 0.02, 7)`) says what a tensor a revision step
    introduces holds when a history writes a file at that revision: `zeros()`, `ones()` or
    `normal(mean, std, seed)`.
    """

    __init__ = Node.__init__  # positional arguments: see Node

    keyword = "init"
    _positional = ("pattern", "fill")
    fill: OpCall | None = None

    @field_validator("fill")
    @classmethod
    def _a_fill(cls, fill: OpCall | None) -> OpCall | None:
        if fill is not None and fill.name not in FILLS:
            raise ValueError(f"{fill.name}() is not a fill; init takes {', '.join(FILLS)}")
        if fill is not None and len(fill.args) > len(FILLS[fill.name]):
            wanted = f"{fill.name}({', '.join(FILLS[fill.name])})"
            raise ValueError(f"{wanted} takes {len(FILLS[fill.name])} arguments")
        return fill

    def _text(self) -> str:
        fill = f" | {self.fill.to_text()}" if self.fill else ""
        return f"init {self.pattern.to_text()}{fill}"

    def _yaml(self) -> dict[str, Any]:
        doc = super()._yaml()
        return {**doc, "fill": self.fill.to_yaml()} if self.fill else doc


# what `init ... | fill` may say, and the arguments each takes (the shape and dtype come
# from the revision's schema)
FILLS: dict[str, tuple[str, ...]] = {"zeros": (), "ones": (), "normal": ("mean", "std", "seed")}


class Freeze(_PatternStatement):
    """Matching target parameters get `requires_grad=False` (last freeze/unfreeze wins)."""

    __init__ = Node.__init__  # positional arguments: see Node

    keyword = "freeze"


class Unfreeze(_PatternStatement):
    """Matching target parameters get `requires_grad=True` (last freeze/unfreeze wins)."""

    __init__ = Node.__init__  # positional arguments: see Node

    keyword = "unfreeze"


_WORD = re.compile(r"[A-Za-z_][A-Za-z0-9_-]*")


def _op_arg(value: Any) -> Any:
    """Op arguments are whole numbers, finite numbers, words, or lists of those."""
    if isinstance(value, bool):
        raise ValueError("op arguments are numbers, words or lists, not true/false")
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        if value != value or value in (float("inf"), float("-inf")):
            raise ValueError("op arguments must be finite numbers")
        return value
    if isinstance(value, str):
        if not _WORD.fullmatch(value):
            raise ValueError(f"op argument {value!r} is not a word (letters, digits, _ and -)")
        return value
    if isinstance(value, (list, tuple)):
        return tuple(_op_arg(v) for v in value)
    raise ValueError(f"op argument {value!r} is not a number, a word or a list")


class OpCall(Node):
    """One tensor op in a chain: `transpose(0, 1)`, `split([4096, 1024, 1024], 0)`."""

    __init__ = Node.__init__  # positional arguments: see Node

    _positional = ("name", "args")
    name: str
    args: tuple[Any, ...] = ()

    @field_validator("name")
    @classmethod
    def _is_word(cls, name: str) -> str:
        if not _WORD.fullmatch(name):
            raise ValueError(f"op name {name!r} is not a word")
        return name

    @field_validator("args", mode="before")
    @classmethod
    def _args(cls, args: Any) -> tuple:
        return tuple(_op_arg(a) for a in args)

    def to_text(self) -> str:
        return f"{self.name}({', '.join(arg_text(a) for a in self.args)})"

    def to_yaml(self) -> dict[str, Any]:
        return {self.name: [_arg_yaml(a) for a in self.args]}


def arg_text(arg: Any) -> str:
    if isinstance(arg, tuple):
        return "[" + ", ".join(arg_text(a) for a in arg) + "]"
    return repr(arg) if isinstance(arg, float) else str(arg)


def _arg_yaml(arg: Any) -> Any:
    return [_arg_yaml(a) for a in arg] if isinstance(arg, tuple) else arg


def _ops_text(ops: tuple[OpCall, ...]) -> str:
    return "".join(f" | {op.to_text()}" for op in ops)


class _OpsStatement(Statement):
    ops: tuple[OpCall, ...]

    @field_validator("ops")
    @classmethod
    def _some(cls, ops: tuple[OpCall, ...]) -> tuple[OpCall, ...]:
        if not ops:
            raise ValueError(f"{cls.keyword} needs at least one op after |")
        return ops


class Transform(_OpsStatement, _PatternStatement):
    """`transform "blocks.*.attn.qkv.weight" | transpose(0, 1)`: one-to-one ops on matching keys."""

    __init__ = Node.__init__  # positional arguments: see Node

    keyword = "transform"
    _positional = ("pattern", "ops")

    def _text(self) -> str:
        return f"transform {self.pattern.to_text()}{_ops_text(self.ops)}"

    def _yaml(self) -> dict[str, Any]:
        return {
            "transform": {"from": self.pattern.to_yaml(), "ops": [op.to_yaml() for op in self.ops]}
        }


class Merge(_OpsStatement):
    """`merge "a.{i}.q", "a.{i}.k" -> "a.{i}.qk" | cat(0)`: several tensors become one."""

    __init__ = Node.__init__  # positional arguments: see Node

    keyword = "merge"
    _positional = ("patterns", "target", "ops")
    patterns: tuple[Pattern, ...]
    target: str

    @field_validator("patterns", mode="before")
    @classmethod
    def _coerce(cls, value: Any) -> Any:
        return tuple(_as_pattern(v) for v in value)

    @field_validator("patterns")
    @classmethod
    def _some_patterns(cls, value: tuple) -> tuple:
        if not value:
            raise ValueError("merge needs at least one source pattern")
        return value

    def _text(self) -> str:
        sources = ", ".join(p.to_text() for p in self.patterns)
        return f"merge {sources} -> {quote(self.target)}{_ops_text(self.ops)}"

    def _yaml(self) -> dict[str, Any]:
        return {
            "merge": {
                "from": [p.to_yaml() for p in self.patterns],
                "to": self.target,
                "ops": [op.to_yaml() for op in self.ops],
            }
        }


class Split(_OpsStatement, _PatternStatement):
    """`split "a.qkv" -> "a.q", "a.k", "a.v" | split([8, 4, 4], 0)`: one tensor becomes several."""

    __init__ = Node.__init__  # positional arguments: see Node

    keyword = "split"
    _positional = ("pattern", "targets", "ops")
    targets: tuple[str, ...]

    @field_validator("targets")
    @classmethod
    def _some_targets(cls, value: tuple) -> tuple:
        if not value:
            raise ValueError("split needs at least one target")
        return value

    def _text(self) -> str:
        targets = ", ".join(quote(t) for t in self.targets)
        return f"split {self.pattern.to_text()} -> {targets}{_ops_text(self.ops)}"

    def _yaml(self) -> dict[str, Any]:
        return {
            "split": {
                "from": self.pattern.to_yaml(),
                "to": list(self.targets),
                "ops": [op.to_yaml() for op in self.ops],
            }
        }


PROBLEMS = ("mismatch", "missing", "unexpected", "unused")
ACTIONS: dict[str, tuple[str, ...]] = {
    "mismatch": ("error", "skip"),
    "missing": ("error", "warn", "ignore"),
    "unexpected": ("error", "warn", "ignore"),
    "unused": ("error", "warn", "ignore"),
}
MismatchAction = Literal["error", "skip"]
MissingAction = Literal["error", "warn", "ignore"]


class Policy(Statement):
    """`on missing warn`: what a problem of a kind does (error by default)."""

    __init__ = Node.__init__  # positional arguments: see Node

    keyword = "on"
    optionable = False
    _positional = ("problem", "action")
    problem: Literal["mismatch", "missing", "unexpected", "unused"]
    action: Literal["error", "skip", "warn", "ignore"]

    @model_validator(mode="after")
    def _action_fits(self) -> Policy:
        if self.action not in ACTIONS[self.problem]:
            raise ValueError(
                f"'on {self.problem}' takes {' | '.join(ACTIONS[self.problem])}, not {self.action!r}"
            )
        return self

    def _text(self) -> str:
        return f"on {self.problem} {self.action}"

    def _yaml(self) -> dict[str, Any]:
        return {f"on_{self.problem}": self.action}


_REVISION_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


def _revision_id(value: str) -> str:
    if value in ("head", "base"):
        raise ValueError(f"{value!r} names a history's newest or first revision: not an id")
    if not _REVISION_ID.fullmatch(value):
        raise ValueError(
            f"revision id {value!r}: letters, digits, '.', '_' and '-', starting with a "
            "letter or digit, at most 128"
        )
    return value


class Revision(Statement):
    """`revision "0003-fuse-qkv" from "0002-add-layer"`: this file is one step of a history.

    A base revision has no parents; a merge names two (`from "a", "b"`).
    """

    __init__ = Node.__init__  # positional arguments: see Node

    keyword = "revision"
    optionable = False
    _positional = ("id", "parents")
    id: str
    parents: tuple[str, ...] = ()

    @field_validator("id")
    @classmethod
    def _id(cls, value: str) -> str:
        return _revision_id(value)

    @field_validator("parents", mode="before")
    @classmethod
    def _as_tuple(cls, value: Any) -> Any:
        return (value,) if isinstance(value, str) else value

    @model_validator(mode="after")
    def _parents(self) -> Revision:
        for p in self.parents:
            _revision_id(p)
        if self.id in self.parents:
            raise ValueError(f"revision {self.id!r} names itself as its parent")
        if len(set(self.parents)) != len(self.parents):
            raise ValueError(f"revision {self.id!r} names a parent twice")
        return self

    def _text(self) -> str:
        parents = ", ".join(quote(p) for p in self.parents)
        return f"revision {quote(self.id)}" + (f" from {parents}" if parents else "")

    def _yaml(self) -> dict[str, Any]:
        doc: dict[str, Any] = {"revision": self.id}
        if self.parents:
            doc["from"] = self.parents[0] if len(self.parents) == 1 else list(self.parents)
        return doc


class Include(Statement):
    """Splice another rule file here; `path` is relative to the including file."""

    __init__ = Node.__init__  # positional arguments: see Node

    keyword = "include"
    optionable = False
    _positional = ("path",)
    path: str

    @field_validator("path")
    @classmethod
    def _not_empty(cls, path: str) -> str:
        if not path:
            raise ValueError("include needs a file path")
        return path

    def _text(self) -> str:
        return f"include {quote(self.path)}"

    def _yaml(self) -> dict[str, Any]:
        return {"include": self.path}


AnyStatement = (
    Revision
    | Strip
    | Prefix
    | Rename
    | Skip
    | Transform
    | Merge
    | Split
    | Init
    | Freeze
    | Unfreeze
    | Policy
    | Include
)
STATEMENTS: dict[str, type[Statement]] = {cls.keyword: cls for cls in get_args(AnyStatement)}


class Ruleset(Node):
    """An ordered list of statements, as written in one file (includes not yet spliced)."""

    __init__ = Node.__init__  # positional arguments: see Node

    _positional = ("rules",)
    version: int = LANGUAGE_VERSION
    rules: tuple[AnyStatement, ...] = ()
    file: str | None = Field(default=None, exclude=True, repr=False)
    text: str | None = Field(default=None, exclude=True, repr=False)  # the source, for carets

    @field_validator("rules", mode="before")
    @classmethod
    def _statements(cls, rules: Any) -> Any:
        for i, rule in enumerate(rules if isinstance(rules, (list, tuple)) else ()):
            if not isinstance(rule, Statement):
                raise ValueError(
                    f"rules[{i}] is {rule!r}, not a statement: build them with ckptmap.rules "
                    "(Strip('module.'), Rename('a', 'b'), ...), or parse rule text with "
                    "ckptmap.parse"
                )
        return rules

    @field_validator("version")
    @classmethod
    def _known_version(cls, version: int) -> int:
        if version != LANGUAGE_VERSION:
            raise ValueError(
                f"unsupported language version {version} (this ckptmap reads {LANGUAGE_VERSION})"
            )
        return version

    def to_text(self) -> str:
        """Canonical DSL text: the header, then one statement a line."""
        body = "".join(f"{rule.to_text()}\n" for rule in self.rules)
        return f"ckptmap {self.version}\n\n{body}"

    def to_yaml(self) -> str:
        """Canonical YAML text (`ckptmap: 1`, `rules: [...]`)."""
        doc = {"ckptmap": self.version, "rules": [rule.to_yaml() for rule in self.rules]}
        import yaml

        return yaml.dump(doc, Dumper=_dumper(), sort_keys=False, width=1000)

    def to_json(self) -> str:
        """The YAML form as JSON."""
        import json

        doc = {"ckptmap": self.version, "rules": [rule.to_yaml() for rule in self.rules]}
        text = json.dumps(doc, indent=2, ensure_ascii=False)
        # characters YAML readers refuse raw (JSON rule files are read by the YAML reader)
        return (
            re.sub(r"[\x7f-\x9f\ufeff\ufffe\uffff]", lambda m: f"\\u{ord(m[0]):04x}", text) + "\n"
        )


@functools.cache
def _dumper() -> Any:
    """PyYAML's safe dumper, with lists of plain values on one line (`ops: [{transpose:
    [0, 1]}]`); made on first use (a command that writes no YAML never imports it)."""
    import yaml

    class Dumper(yaml.SafeDumper):
        pass

    def represent_list(dumper: yaml.SafeDumper, data: list) -> yaml.Node:
        flat = all(not isinstance(x, dict) for x in data)
        return dumper.represent_sequence("tag:yaml.org,2002:seq", data, flow_style=flat)

    Dumper.add_representer(list, represent_list)
    return Dumper


# --- quoting -------------------------------------------------------------------------

_ESCAPES = {"\\": "\\\\", '"': '\\"', "\n": "\\n", "\t": "\\t", "\r": "\\r"}
UNESCAPES = {v[1]: k for k, v in _ESCAPES.items()}


def quote(text: str) -> str:
    """A DSL string literal for `text`."""
    return '"' + "".join(_ESCAPES.get(ch, ch) for ch in text) + '"'


def regex_literal(text: str) -> str:
    """A DSL `/regex/` literal: unescaped slashes get a backslash."""
    out, i = [], 0
    while i < len(text):
        ch = text[i]
        if ch == "\\" and i + 1 < len(text):
            out.append(text[i : i + 2])
            i += 2
            continue
        out.append("\\/" if ch == "/" else ch)
        i += 1
    return "/" + "".join(out) + "/"


def _ends_in_lone_backslash(text: str) -> bool:
    run = len(text) - len(text.rstrip("\\"))
    return run % 2 == 1


# --- the YAML form, for validation and `ckptmap schema` ---------------------------------

_FORM = ConfigDict(extra="forbid", populate_by_name=True)


class RegexForm(BaseModel):
    """A regex pattern in YAML: `{regex: "blk_(\\\\d+)\\\\.(.*)"}` (must match the whole key)."""

    model_config = _FORM
    regex: str


PatternForm = Annotated[
    str | RegexForm,
    Field(description="A string pattern (`*`, `**`, `{name}`) or {regex: ...}"),
]


class RenameArgs(BaseModel):
    model_config = _FORM
    from_: PatternForm = Field(alias="from")
    to: str


OpsForm = Annotated[
    list[dict[str, Any]],
    Field(min_length=1, description="Ops in order, each {name: [args]}: [{transpose: [0, 1]}]"),
]


def _ops_not_text(ops: Any) -> Any:
    """`ops: ["transpose(0, 1)"]` is the DSL's spelling: say the YAML one, for this op."""
    if isinstance(ops, str):  # `ops: "transpose(0, 1)"`: one op, as text
        _ops_not_text([ops])
    for i, op in enumerate(ops if isinstance(ops, list) else ()):
        if isinstance(op, str):
            bare = op.strip()
            example = f"{{{bare}: [args]}}" if _WORD.fullmatch(bare) else "{transpose: [0, 1]}"
            call = re.fullmatch(r"\s*([A-Za-z_][A-Za-z0-9_-]*)\s*\((.*)\)\s*", op, re.S)
            with contextlib.suppress(Exception):  # the op as YAML, when the text reads as one
                import yaml

                args = yaml.safe_load(f"[{call[2]}]")  # type: ignore[index]
                spelled = OpCall(call[1], tuple(args)).to_yaml()  # type: ignore[index]
                example = yaml.dump(spelled, Dumper=_dumper(), default_flow_style=True).strip()
            raise ValueError(
                f"op {i + 1} is the text {op!r}; in YAML each op is a mapping "
                f"{{name: [args]}}: write {example}"
            )
    return ops


class _OpsArgs(BaseModel):
    model_config = _FORM
    _text_ops = field_validator("ops", mode="before", check_fields=False)(_ops_not_text)


class TransformArgs(_OpsArgs):
    from_: PatternForm = Field(alias="from")
    ops: OpsForm


class MergeArgs(_OpsArgs):
    from_: list[PatternForm] = Field(alias="from", min_length=1)
    to: str
    ops: OpsForm


class SplitArgs(_OpsArgs):
    from_: PatternForm = Field(alias="from")
    to: list[str] = Field(min_length=1)
    ops: OpsForm


_OPTIONAL = Annotated[bool, Field(description="The rule may match nothing (not an unused rule)")]


def _form(name: str, optionable: bool = True, **fields: Any) -> type[BaseModel]:
    namespace: dict[str, Any] = {"model_config": _FORM, "__annotations__": fields}
    if optionable:
        namespace["__annotations__"] = {**fields, "optional": _OPTIONAL}
        namespace["optional"] = False
    return type(name, (BaseModel,), namespace)


FORMS: dict[str, type[BaseModel]] = {
    "strip": _form("StripForm", strip=Annotated[str, Field(min_length=1)]),
    "prefix": _form("PrefixForm", False, prefix=Annotated[str, Field(min_length=1)]),
    "rename": _form("RenameForm", rename=RenameArgs),
    "skip": _form("SkipForm", skip=PatternForm),
    "transform": _form("TransformForm", transform=TransformArgs),
    "merge": _form("MergeForm", merge=MergeArgs),
    "split": _form("SplitForm", split=SplitArgs),
    "init": _form("InitForm", init=PatternForm),
    "freeze": _form("FreezeForm", freeze=PatternForm),
    "unfreeze": _form("UnfreezeForm", unfreeze=PatternForm),
    "on_mismatch": _form("OnMismatchForm", False, on_mismatch=MismatchAction),
    "on_missing": _form("OnMissingForm", False, on_missing=MissingAction),
    "on_unexpected": _form("OnUnexpectedForm", False, on_unexpected=MissingAction),
    "on_unused": _form("OnUnusedForm", False, on_unused=MissingAction),
    "include": _form("IncludeForm", False, include=Annotated[str, Field(min_length=1)]),
}
FORMS["init"] = type(
    "InitForm",
    (FORMS["init"],),
    {
        "__annotations__": {"fill": dict[str, list[Any]] | None},
        "fill": Field(default=None, description="zeros: [], ones: [] or normal: [mean, std, seed]"),
    },
)


class RevisionForm(BaseModel):
    """`- revision: "0003-fuse-qkv"` with `from: "0002-add-layer"` (or a list: a merge)."""

    model_config = _FORM
    revision: str
    from_: str | list[str] | None = Field(default=None, alias="from")


FORMS = {"revision": RevisionForm, **FORMS}


class RulesDocument(BaseModel):
    """A rule file in YAML or JSON form."""

    model_config = ConfigDict(extra="forbid", title="ckptmap rules")
    ckptmap: Literal[1] = 1
    rules: list[Any] = []

    @classmethod
    def json_schema(cls) -> dict[str, Any]:
        """The JSON Schema editors use for `.yaml` rule files."""
        schema = cls.model_json_schema()
        defs = schema.setdefault("$defs", {})
        refs = []
        for form in FORMS.values():
            sub = form.model_json_schema(ref_template="#/$defs/{model}")
            defs.update(sub.pop("$defs", {}))
            defs[form.__name__] = sub
            refs.append({"$ref": f"#/$defs/{form.__name__}"})
        schema["properties"]["rules"]["items"] = {"anyOf": refs}
        return schema


def statement_from_form(key: str, form: BaseModel, span: Span | None) -> Statement:
    """The IR node for one validated YAML item."""
    statement = _statement_from_form(key, form, span)
    if getattr(form, "optional", False):
        return type(statement)(**{**dict(statement), "optional": True})
    return statement


def _statement_from_form(key: str, form: BaseModel, span: Span | None) -> Statement:
    value = getattr(form, key)

    def pattern(v: Any) -> Pattern:
        return (
            Pattern(v.regex, True, span=span) if isinstance(v, RegexForm) else Pattern(v, span=span)
        )

    def ops(items: list[dict[str, Any]]) -> tuple[OpCall, ...]:
        out = []
        for item in items:
            if len(item) != 1:
                raise ValueError("each op is {name: [args]}")
            ((name, args),) = item.items()
            args = [] if args is None else args if isinstance(args, list) else [args]
            out.append(OpCall(name, tuple(args), span=span))
        return tuple(out)

    if key.startswith("on_"):
        return Policy(key[3:], value, span=span)
    if key == "revision":
        return Revision(value, form.from_ or (), span=span)  # type: ignore[attr-defined]
    if key == "init":
        fill = form.fill  # type: ignore[attr-defined]
        return Init(pattern(value), ops([fill])[0] if fill else None, span=span)
    if key == "transform":
        return Transform(pattern(value.from_), ops(value.ops), span=span)
    if key == "merge":
        return Merge(tuple(pattern(p) for p in value.from_), value.to, ops(value.ops), span=span)
    if key == "split":
        return Split(pattern(value.from_), tuple(value.to), ops(value.ops), span=span)
    if key == "rename":
        return Rename(pattern(value.from_), value.to, span=span)
    if key in ("strip", "prefix", "include"):
        return STATEMENTS[key](value, span=span)
    return STATEMENTS[key](pattern(value), span=span)
