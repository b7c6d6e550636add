"""Key patterns and rename targets: the one matcher that every statement uses.

String patterns match dotted keys segment by segment; a pattern matches a key
when it matches the key's leading segments (the key itself or anything under
it). Regex patterns must match the whole key. Both compile to one Python
regex, built once.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


class PatternError(ValueError):
    """A malformed pattern or target; `offset` is where in the text (0-based)."""

    def __init__(self, message: str, offset: int = 0, code: str = "CKM203"):
        super().__init__(message)
        self.message = message
        self.offset = offset
        self.code = code


@dataclass(frozen=True)
class Match:
    """What a pattern bound on a key, and what of the key is left after the match."""

    captures: dict[str, str]
    rest: str  # "" or ".more.segments" (string patterns only)


class Matcher:
    """A compiled pattern. `match(key)` returns a `Match` or None."""

    __slots__ = ("_regex", "is_regex", "literal", "names", "text")

    def __init__(self, text: str, regex: bool = False):
        self.text = text
        self.is_regex = regex
        if regex:
            try:
                self._regex = re.compile(text)
            except re.error as e:
                raise PatternError(f"invalid regex: {e.msg}", e.pos or 0, "CKM201") from None
            self.names = frozenset(self._regex.groupindex) | {
                str(i) for i in range(self._regex.groups + 1)
            }
            self.literal = ""
        else:
            source, names, self.literal = _glob_to_regex(text)
            self._regex = re.compile(source)
            self.names = frozenset(names)

    def match(self, key: str) -> Match | None:
        if not key.startswith(self.literal):
            return None
        if self.is_regex:
            m = self._regex.fullmatch(key)
            if m is None:
                return None
            captures = {str(i): m.group(i) or "" for i in range(self._regex.groups + 1)}
            captures.update((k, v or "") for k, v in m.groupdict().items())
            return Match(captures, "")
        m = self._regex.fullmatch("." + key)
        if m is None:
            return None
        groups = m.groupdict()
        rest = groups.pop("_rest") or ""
        return Match({k[2:]: v for k, v in groups.items()}, rest)

    def spans(self, key: str) -> tuple[dict[str, tuple[int, int]], tuple[int, int] | None] | None:
        """Where each capture and the rest lie in `key` (string patterns), or None: no match."""
        if self.is_regex or not key.startswith(self.literal):
            return None
        m = self._regex.fullmatch("." + key)
        if m is None:
            return None
        captures = {
            name[2:]: (m.start(name) - 1, m.end(name) - 1)
            for name in self._regex.groupindex
            if name != "_rest"
        }
        rest = None if m.start("_rest") < 0 else (m.start("_rest") - 1, m.end("_rest") - 1)
        return captures, rest

    def __repr__(self) -> str:
        return f"Matcher({self.text!r}, regex={self.is_regex})"


def _glob_to_regex(text: str) -> tuple[str, list[str], str]:
    """(regex source matched against '.' + key, capture names, literal key prefix)."""
    if not text:
        raise PatternError("empty pattern")
    names: list[str] = []
    parts: list[str] = []
    offset = 0
    for segment in text.split("."):
        if not segment:
            raise PatternError(
                "empty segment: a pattern has no leading, trailing or doubled dots", offset
            )
        if segment == "**":
            parts.append(r"(?:\.[^.]+)*?")
        else:
            parts.append(r"\." + _segment_to_regex(segment, offset, names))
        offset += len(segment) + 1
    literal = re.split(r"[*{]", text.replace("{{", "\0").replace("}}", "\0"), maxsplit=1)[0]
    literal = literal.split("\0", 1)[0]
    return "".join(parts) + r"(?P<_rest>\..+)?", names, literal


def _segment_to_regex(segment: str, offset: int, names: list[str]) -> str:
    out: list[str] = []
    i = 0
    while i < len(segment):
        ch = segment[i]
        pair = segment[i : i + 2]
        if pair in ("{{", "}}"):
            out.append(re.escape(ch))
            i += 2
        elif pair == "**":
            raise PatternError("`**` must be a whole segment, between dots", offset + i)
        elif ch == "*":
            out.append(r"[^.]*")
            i += 1
        elif ch == "{":
            end = segment.find("}", i)
            if end < 0:
                raise PatternError("unclosed `{` in a capture", offset + i)
            name = segment[i + 1 : end]
            _check_capture_name(name, offset + i)
            if name in names:
                raise PatternError(f"capture {{{name}}} is bound twice", offset + i)
            names.append(name)
            out.append(f"(?P<c_{name}>[^.]+?)")
            i = end + 1
        elif ch == "}":
            raise PatternError("`}` without `{` (write `}}` for a literal brace)", offset + i)
        else:
            out.append(re.escape(ch))
            i += 1
    return "".join(out)


def _check_capture_name(name: str, offset: int) -> None:
    if not name:
        raise PatternError("empty capture `{}`", offset)
    if name.isdigit():
        raise PatternError(
            f"numbered capture {{{name}}} in a string pattern: name it, like {{i}}", offset
        )
    if not _NAME.fullmatch(name):
        raise PatternError(f"capture name {name!r} is not a word (letters, digits, _)", offset)


class Template:
    """A rename target: text with `{name}` / `{n}` substitutions, `{{` `}}` for braces."""

    __slots__ = ("parts", "refs", "text")

    def __init__(self, text: str):
        self.text = text
        self.parts: list[str | tuple[str]] = []  # literal text, or (capture name,)
        self.refs: list[tuple[str, int]] = []  # (name, offset) for each substitution
        literal: list[str] = []
        i = 0
        while i < len(text):
            ch, pair = text[i], text[i : i + 2]
            if pair in ("{{", "}}"):
                literal.append(ch)
                i += 2
            elif ch == "{":
                end = text.find("}", i)
                if end < 0:
                    raise PatternError("unclosed `{` in the target", i, "CKM207")
                name = text[i + 1 : end]
                if not name or not (name.isdigit() or _NAME.fullmatch(name)):
                    raise PatternError(
                        f"`{{{name}}}` is not a capture name or group number", i, "CKM207"
                    )
                if literal:
                    self.parts.append("".join(literal))
                    literal = []
                self.parts.append((name,))
                self.refs.append((name, i))
                i = end + 1
            elif ch == "}":
                raise PatternError(
                    "`}` without `{` in the target (write `}}` for a brace)", i, "CKM207"
                )
            elif ch == "*":  # it would be written as is: every key would land on one name
                raise PatternError(
                    "`*` in a target: wildcards match in patterns; a target names what it "
                    "keeps with {captures}",
                    i,
                    "CKM212",
                )
            else:
                literal.append(ch)
                i += 1
        if literal:
            self.parts.append("".join(literal))

    def render(self, captures: dict[str, str]) -> str:
        return "".join(p if isinstance(p, str) else captures[p[0]] for p in self.parts)
