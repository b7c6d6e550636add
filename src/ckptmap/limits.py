"""How much an untrusted file or rule may ask of ckptmap, each limit raisable from the
environment: a hostile checkpoint gets a one-line refusal in well under a second, not a
minute of work or the allocator's error.

| variable                   | default      | bounds                                     |
| CKPTMAP_MAX_KEYS           | 500,000      | tensors in one checkpoint or key set       |
| CKPTMAP_MAX_KEY_LENGTH     | 4,096        | characters in one tensor name              |
| CKPTMAP_MAX_HEADER_BYTES   | 100 MiB      | a safetensors header (safetensors' own)    |
| CKPTMAP_MAX_TEXT_BYTES     | 64 MiB       | a rule file, a saved plan, a target JSON   |
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

from .errors import CheckpointError

DEFAULTS = {
    "CKPTMAP_MAX_KEYS": 500_000,
    "CKPTMAP_MAX_KEY_LENGTH": 4096,
    "CKPTMAP_MAX_HEADER_BYTES": 100 * 1024 * 1024,
    "CKPTMAP_MAX_TEXT_BYTES": 64 * 1024 * 1024,
}


def limit(name: str) -> int:
    """The limit in force: the environment's value when it is a whole number, else the default."""
    text = os.environ.get(name, "")
    return int(text) if text.strip().isdigit() else DEFAULTS[name]


def check_count(count: int, where: str) -> None:
    most = limit("CKPTMAP_MAX_KEYS")
    if count > most:
        raise CheckpointError(
            f"{where}: more than {most:,} tensors ({count:,})",
            code="CKM512",
            hint="a larger limit: CKPTMAP_MAX_KEYS=N in the environment",
        )


def check_keys(keys: Iterable[str], where: str) -> None:
    """Refuse more keys, or a longer key, than the limits allow."""
    keys = keys if isinstance(keys, (list, tuple, dict, set, frozenset)) else list(keys)
    check_count(len(keys), where)
    longest = max(map(len, keys), default=0)
    most = limit("CKPTMAP_MAX_KEY_LENGTH")
    if longest > most:
        name = next(k for k in keys if len(k) == longest)
        raise CheckpointError(
            f"{where}: a tensor name of {longest:,} characters ({name[:40]!r}...), over the "
            f"limit of {most:,}",
            code="CKM512",
            hint="a larger limit: CKPTMAP_MAX_KEY_LENGTH=N in the environment",
        )


def check_text_size(path: Path, error: type = CheckpointError, code: str = "CKM512") -> None:
    """A text file (rules, a plan, target shapes) is read whole: refuse one over the limit."""
    import os

    try:
        size = os.stat(path).st_size
    except OSError:
        return  # the read that follows says what is wrong
    most = limit("CKPTMAP_MAX_TEXT_BYTES")
    if size > most:
        raise error(
            f"{path}: {size:,} bytes, over the limit of {most:,} for a text file",
            code=code,
            hint="a larger limit: CKPTMAP_MAX_TEXT_BYTES=N in the environment",
        )
