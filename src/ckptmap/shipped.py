"""Files that ship inside the wheel: the grammar and the reviewed rule files.

In a wheel they sit inside the package; in a source checkout, at the
repository root (the one copy of each).
"""

from __future__ import annotations

from pathlib import Path

from .errors import CkptmapError, RuleSyntaxError

_PACKAGE = Path(__file__).resolve().parent
_CHECKOUT = _PACKAGE.parents[1]
# where each shipped folder lives: (inside the package, in a checkout)
_FOLDERS = {"grammar": ("grammar", "grammar"), "rules": ("builtin_rules", "rules")}


def shipped_file(folder: str, name: str) -> Path:
    """The path of a shipped file, wherever this ckptmap is installed."""
    inside, checkout = _FOLDERS[folder]
    for candidate in (_PACKAGE / inside / name, _CHECKOUT / checkout / name):
        if candidate.is_file():
            return candidate
    raise CkptmapError(f"{folder}/{name} is missing from this installation")


SHIPPED_PREFIX = "ckptmap:"  # `include "ckptmap:wrappers"`, `ckptmap plan ckptmap:ddp ...`


def shipped_rules() -> dict[str, Path]:
    """The reviewed rule files that ship with ckptmap, by name (`wrappers`, `ddp`, ...)."""
    found: dict[str, Path] = {}
    inside, checkout = _FOLDERS["rules"]
    for folder in (_PACKAGE / inside, _CHECKOUT / checkout):
        for path in sorted(folder.glob("*.ckmap")) if folder.is_dir() else ():
            found.setdefault(path.stem, path)
    return dict(sorted(found.items()))


def shipped_rule_file(name: str) -> Path:
    """`ckptmap:NAME` (or NAME) -> the shipped rule file; a RuleSyntaxError naming the choices."""
    bare = name.removeprefix(SHIPPED_PREFIX).removesuffix(".ckmap")
    rules = shipped_rules()
    if bare not in rules:
        raise RuleSyntaxError(
            f"{name}: no rule file of that name ships with ckptmap",
            code="CKM113",
            hint="shipped: " + ", ".join(SHIPPED_PREFIX + n for n in rules),
        )
    return rules[bare]


def describe_rule_file(path: Path) -> str:
    """A rule file's first comment paragraph, as one line."""
    lines = []
    for line in path.read_text(encoding="utf-8").splitlines():
        text = line.strip()
        if text.startswith("#"):
            lines.append(text.lstrip("#").strip())
        elif lines:
            break
    return " ".join(lines)
