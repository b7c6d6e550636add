"""Files that ship inside the wheel: the grammar and the reviewed rule files.

In a wheel they sit inside the package; in a source checkout, at the
repository root (the one copy of each).
"""

from __future__ import annotations

from pathlib import Path

from .errors import CkptmapError

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
