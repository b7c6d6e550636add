"""Key patterns and rename targets: the one matcher that every statement uses.

String patterns match dotted keys segment by segment; a pattern matches a key
when it matches the key's leading segments (the key itself or anything under
it). Regex patterns must match the whole key.

Key names come from files downloaded from anywhere, so matching a string pattern
never backtracks without bound: a pattern whose regex would stay linear (at most
one `**`, at most one capture or `*` per segment) runs as one compiled regex; any
other runs segment by segment, each segment's captures taken leftmost-shortest
with `str.find`, `**` aligned by a table over segments: time linear in the key
for a given pattern, with the same result the regex would give.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from typing import Any

_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


SKIP = object()  # what a `skip` rule answers for a key it drops
REGEX_BUDGET = 5.0  # seconds one regex rule may spend matching, over all keys of a plan


MAX_REPEAT_COPIES = 100_000


def _repeat_copies(text: str) -> int:
    """The most copies of one piece that nested counted repeats ask for: `(?:(?:a{1000}){1000})`
    is a million; a regex engine builds them before matching anything."""
    try:
        import re._parser as sre  # type: ignore[import-not-found]
    except ImportError:  # Python 3.10
        import sre_parse as sre

    repeats = {
        getattr(sre, n)
        for n in ("MAX_REPEAT", "MIN_REPEAT", "POSSESSIVE_REPEAT")
        if hasattr(sre, n)
    }

    def walk(items: Any) -> int:
        most = 1
        for op, av in items:
            if op in repeats:
                low, high, sub = av
                count = low if high == sre.MAXREPEAT else high
                most = max(most, max(count, 1) * walk(sub))
            elif op == sre.SUBPATTERN:
                most = max(most, walk(av[-1]))
            elif op == sre.BRANCH:
                most = max(most, *(walk(branch) for branch in av[1]))
            elif op in (sre.ASSERT, sre.ASSERT_NOT):
                most = max(most, walk(av[1]))
            elif op == getattr(sre, "ATOMIC_GROUP", None):
                most = max(most, walk(av))
        return most

    return walk(sre.parse(text))


class PatternError(ValueError):
    """A malformed pattern or target; `offset` is where in the text (0-based)."""

    def __init__(self, message: str, offset: int = 0, code: str = "CKM203"):
        super().__init__(message)
        self.message = message
        self.offset = offset
        self.code = code


class RegexTimeout(PatternError):
    """A user regex that spent its time budget: catastrophic backtracking on some key."""


@dataclass(frozen=True)
class Match:
    """What a pattern bound on a key, and what of the key is left after the match."""

    captures: dict[str, str]
    rest: str  # "" or ".more.segments" (string patterns only)


class Matcher:
    """A compiled pattern. `match(key)` returns a `Match` or None."""

    __slots__ = ("_budget", "_regex", "_segments", "is_regex", "literal", "names", "text")

    def __init__(self, text: str, regex: bool = False):
        self.text = text
        self.is_regex = regex
        self._segments: list[_Segment | None] | None = None
        self._regex: Any  # `re` for string patterns, the `regex` engine for user regexes
        if regex:
            # the `regex` engine, not `re`: it can give up after a time budget (a regex from a
            # shared rule file meets key names from a downloaded file)
            import regex as engine

            try:
                re.compile(text)  # re's messages point at the mistake; regex's at the end
                copies = _repeat_copies(text)
                if copies > MAX_REPEAT_COPIES:  # the engine would build them all: memory
                    raise PatternError(
                        f"invalid regex: nested repeats make {copies:,} copies of a piece "
                        f"(at most {MAX_REPEAT_COPIES:,})",
                        0,
                        "CKM201",
                    )
                self._regex = engine.compile(text)
            except PatternError:
                raise
            except re.error as e:
                raise PatternError(f"invalid regex: {e.msg}", e.pos or 0, "CKM201") from None
            except engine.error as e:
                message = str(e).split(" at position")[0]
                at = getattr(e, "pos", None) or 0  # the engine has it; its type stubs do not
                raise PatternError(f"invalid regex: {message}", at, "CKM201") from None
            except (RecursionError, OverflowError, ValueError, MemoryError) as e:
                why = "nests too deeply" if isinstance(e, RecursionError) else str(e)
                raise PatternError(f"invalid regex: {why}", 0, "CKM201") from None
            self._budget = REGEX_BUDGET
            self.names = frozenset(self._regex.groupindex) | {
                str(i) for i in range(self._regex.groups + 1)
            }
            self.literal = ""
        else:
            source, names, self.literal = _glob_to_regex(text)
            self._regex = re.compile(source)
            self.names = frozenset(names)
            segments = _segments_of(text)
            if sum(s is None for s in segments) > 1 or any(
                s is not None and len(s.holes) > 1 for s in segments
            ):
                self._segments = segments  # the regex could backtrack: match segment-wise

    def match(self, key: str) -> Match | None:
        if not key.startswith(self.literal):
            return None
        if self.is_regex:
            m = self._fullmatch(key)
            if m is None:
                return None
            captures = {str(i): m.group(i) or "" for i in range(self._regex.groups + 1)}
            captures.update((k, v or "") for k, v in m.groupdict().items())
            return Match(captures, "")
        if self._segments is not None:
            found = self.spans(key)
            if found is None:
                return None
            spans, tail = found
            return Match(
                {name: key[a:b] for name, (a, b) in spans.items()},
                key[tail[0] : tail[1]] if tail else "",
            )
        m = self._regex.fullmatch("." + key)
        if m is None:
            return None
        groups = m.groupdict()
        rest = groups.pop("_rest") or ""
        return Match({k[2:]: v for k, v in groups.items()}, rest)

    def _fullmatch(self, key: str):
        """A user regex against a key, within what is left of this pattern's time budget."""
        start = time.perf_counter()
        try:
            return self._regex.fullmatch(key, timeout=max(self._budget, 0.001))
        except TimeoutError:
            raise RegexTimeout(
                f"the regex /{self.text}/ spent its {REGEX_BUDGET:g} s budget (at key "
                f"{key[:60]!r}{'...' if len(key) > 60 else ''}): it backtracks without bound; "
                "avoid nested repeats like (a+)+",
                0,
                "CKM213",
            ) from None
        finally:
            self._budget -= time.perf_counter() - start

    def spans(self, key: str) -> tuple[dict[str, tuple[int, int]], tuple[int, int] | None] | None:
        """Where each capture and the rest lie in `key` (string patterns), or None: no match."""
        if self.is_regex or not key.startswith(self.literal):
            return None
        if self._segments is not None:
            return _match_segments(self._segments, key)
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
            out.append(r"[^.]*?")  # as few as it can, like a capture
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


class _Segment:
    """One segment of a string pattern: literals around holes (a capture needs at least one
    character, a `*` none): `literals[0] hole literals[1] hole ... literals[-1]`."""

    __slots__ = ("holes", "literals")

    def __init__(self, literals: list[str], holes: list[tuple[str | None, int]]):
        self.literals = literals
        self.holes = holes

    def match(self, s: str) -> list[tuple[str, int, int]] | None:
        """Capture spans within `s`, leftmost-shortest as a lazy regex takes them, or None.

        Taking each literal at its first place leaves the most room to what follows, so
        if any split fits, this one does: one `str.find` per hole."""
        literals, holes = self.literals, self.holes
        first, last = literals[0], literals[-1]
        if not holes:
            return [] if s == first else None
        end = len(s) - len(last)
        if end < len(first) or not s.startswith(first) or not s.endswith(last):
            return None
        pos, spans = len(first), []
        for (name, least), literal in zip(holes, literals[1:-1], strict=False):
            at = s.find(literal, pos + least, end)
            if at < 0:
                return None
            if name is not None:
                spans.append((name, pos, at))
            pos = at + len(literal)
        name, least = holes[-1]
        if end - pos < least:
            return None
        if name is not None:
            spans.append((name, pos, end))
        return spans


def _segments_of(text: str) -> list[_Segment | None]:
    """The pattern's segments (None for `**`), for matching without a regex. The text has
    been checked by `_glob_to_regex`."""
    out: list[_Segment | None] = []
    for segment in text.split("."):
        if segment == "**":
            out.append(None)
            continue
        literals: list[str] = []
        holes: list[tuple[str | None, int]] = []
        current: list[str] = []
        i = 0
        while i < len(segment):
            pair = segment[i : i + 2]
            if pair in ("{{", "}}"):
                current.append(segment[i])
                i += 2
            elif segment[i] in "*{":
                literals.append("".join(current))
                current = []
                if segment[i] == "*":
                    holes.append((None, 0))
                    i += 1
                else:
                    end = segment.index("}", i)
                    holes.append((segment[i + 1 : end], 1))
                    i = end + 1
            else:
                current.append(segment[i])
                i += 1
        literals.append("".join(current))
        # adjacent `*` holes: one hole (a regex `[^.]*[^.]*` means the same)
        out.append(_Segment(literals, holes))
    return out


def _match_segments(
    pattern: list[_Segment | None], key: str
) -> tuple[dict[str, tuple[int, int]], tuple[int, int] | None] | None:
    """Align pattern segments with the key's leading segments as the regex would: each `**`
    takes as few (non-empty) segments as it can, earliest first; what is left over is the
    rest. Capture spans and the rest's span, in key offsets; None when nothing aligns.

    A table of which (pattern segment, key segment) pairs can still finish, filled from
    the end: time proportional to pattern segments times key segments, never more.
    """
    parts = key.split(".")
    starts, at = [], 0
    for part in parts:
        starts.append(at)
        at += len(part) + 1
    n, m = len(parts), len(pattern)
    # done[j]: the pattern is used up at key segment j; what is left is "" or "." + more
    can = [[False] * (n + 1) for _ in range(m + 1)]
    can[m] = [j == n or len(key) - starts[j] > 0 for j in range(n + 1)]
    for i in range(m - 1, -1, -1):
        segment, row, below = pattern[i], can[i], can[i + 1]
        if segment is None:  # `**`: end here, or take one more non-empty segment
            for j in range(n, -1, -1):
                row[j] = below[j] or (j < n and parts[j] != "" and row[j + 1])
        else:
            for j in range(n - 1, -1, -1):
                row[j] = below[j + 1] and segment.match(parts[j]) is not None
    if not can[0][0]:
        return None
    spans: dict[str, tuple[int, int]] = {}
    i = j = 0
    while i < m:  # the preferred path: a `**` ends as soon as the rest can still finish
        segment = pattern[i]
        if segment is None:
            if can[i + 1][j]:
                i += 1
            else:
                j += 1
            continue
        offset = starts[j]
        for name, a, b in segment.match(parts[j]) or ():
            spans[name] = (offset + a, offset + b)
        i, j = i + 1, j + 1
    rest = (starts[j] - 1, len(key)) if j < n else None
    return spans, rest


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


# Keys that differ only in their numbers (layer 0..79, expert 0..255) share a template: the
# planner tries a rule once per template, not once per key.
_DIGIT_BYTES = bytes.maketrans(b"0123456789", b"##########")


def digit_template(name: str) -> str:
    """`name` with every ASCII digit as '#' (bytes.translate is several times faster than
    str.translate, and UTF-8 never uses the digits' bytes inside other characters)."""
    return (
        name.encode("utf-8", "surrogatepass")
        .translate(_DIGIT_BYTES)
        .decode("utf-8", "surrogatepass")
    )


def hash_literals(text: str) -> str:
    """A pattern's digits outside `{captures}` as '#'."""
    out, depth = [], 0
    for ch in text:
        depth += ch == "{"
        out.append(digit_template(ch) if depth == 0 else ch)
        depth -= ch == "}" and depth > 0
    return "".join(out)
