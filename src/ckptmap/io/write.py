"""Writing checkpoints atomically: nothing appears at the destination until it is complete.

A file is written to a temporary name in the destination folder, fsynced and
renamed over; a sharded folder is built under a temporary name beside the
destination and renamed into place. A process killed mid-write leaves nothing
at the destination (its partial file is cleaned up by the next write there).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import CheckpointError
from ..version import __version__
from . import safetensors as st

DCP_SUFFIX = ".dcp"  # an output folder written by torch.distributed.checkpoint

if TYPE_CHECKING:
    import torch

    from ..meta import TensorMeta

TORCH_SUFFIXES = (".pt", ".pth", ".bin")
PARTIAL = ".ckptmap-partial-"


def refuse_overwriting_source(out: Path, sources: Iterable[Path]) -> None:
    """The output may never be, contain, or sit inside a source: checked before any work."""
    refuse_clobbering([("output", out)], [("source", s) for s in sources])


def refuse_clobbering(
    outputs: Iterable[tuple[str, Path | None]], inputs: Iterable[tuple[str, Path | None]]
) -> None:
    """No path a command writes may be, contain, or lie inside a path it reads, nor be another
    of its outputs: compared through symlinks (resolved) and hard links (same inode), before
    anything runs. Each pair is (role, path) so the error says which option it was."""
    writes = [(role, Path(p)) for role, p in outputs if p is not None]
    reads = [(role, Path(p)) for role, p in inputs if p is not None]
    for k, (role, out) in enumerate(writes):
        where = out.resolve()
        for other_role, other in [*reads, *writes[k + 1 :]]:
            there = other.resolve()
            same = where == there or (_exists(out) and _exists(other) and _same_file(out, other))
            if same or where.is_relative_to(there) or there.is_relative_to(where):
                raise CheckpointError(
                    f"{out}: refusing to write over the {other_role} {other}"
                    + (f" (which is {there})" if there != other.absolute() else "")
                    + f": the {role} must be somewhere else",
                    code="CKM530",
                    hint="every path a command writes must differ from every path it reads",
                )


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _exists(path: Path) -> bool:
    return os.path.exists(path)


def _same_file(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def _create_exclusive(out: Path) -> tuple[int, Path]:
    """A new file beside `out` under an unpredictable name, created with O_EXCL (so never
    through a planted symlink), with the permissions a plain `open` would give."""
    fd, name = tempfile.mkstemp(prefix=f".{out.name}{PARTIAL}{os.getpid()}-", dir=out.parent)
    os.fchmod(fd, 0o666 & ~_umask())
    return fd, Path(name)


def refuse_replacing(path: Path) -> None:
    """An existing file is never replaced unless the caller says so (`--overwrite`)."""
    if os.path.lexists(path):
        raise CheckpointError(
            f"{path}: already exists; pass --overwrite to replace it", code="CKM533"
        )


def check_text_destination(path: Path, overwrite: bool = False) -> None:
    """Fail early on a place a text file (a report) cannot be written, before other work."""
    path = Path(path)
    if path.is_dir():
        raise CheckpointError(f"{path}: is a folder", code="CKM531")
    if os.path.exists(path) and not path.is_file():  # a FIFO, a socket, a device (/dev/null)
        raise CheckpointError(
            f"{path}: not a regular file (a device, a FIFO or a socket): it is never replaced",
            code="CKM531",
        )
    if not overwrite:
        refuse_replacing(path)
    if not path.parent.is_dir():
        raise CheckpointError(f"{path}: the folder {path.parent} does not exist", code="CKM531")
    if not os.access(path.parent, os.W_OK):
        raise CheckpointError(f"{path}: the folder {path.parent} is not writable", code="CKM532")


def _previous_sharded_output(folder: Path) -> bool:
    """A folder that holds only a sharded checkpoint (index and shards, or a DCP folder's
    metadata and .distcp files): safe to replace."""
    names = [p.name for p in folder.iterdir()]
    if ".metadata" in names:
        return all(n == ".metadata" or re.fullmatch(r"__\d+_\d+\.distcp", n) for n in names)
    return "model.safetensors.index.json" in names and all(
        n == "model.safetensors.index.json" or re.fullmatch(r"model-\d+-of-\d+\.safetensors", n)
        for n in names
    )


def check_destination(out: Path, sharded: bool, overwrite: bool = False) -> None:
    """Fail early (before any work) on a destination that cannot be written.

    An existing destination is refused unless `overwrite`; even then a folder is
    replaced only when it holds nothing but a sharded checkpoint.
    """
    out = Path(out)
    if sharded or out.suffix == DCP_SUFFIX:  # a folder of files
        empty = out.is_dir() and not out.is_symlink() and not any(out.iterdir())
        if os.path.lexists(out) and not empty:
            if not overwrite:
                raise CheckpointError(
                    f"{out}: already exists; pass --overwrite to replace it", code="CKM533"
                )
            if out.is_symlink() or not out.is_dir() or not _previous_sharded_output(out):
                raise CheckpointError(
                    f"{out}: already exists and holds more than a sharded checkpoint; "
                    "not replaced, even with --overwrite",
                    code="CKM533",
                )
    elif out.suffix not in (".safetensors", *TORCH_SUFFIXES):
        raise CheckpointError(
            f"{out}: name a .safetensors or .pt file, a .dcp folder (torch.distributed."
            "checkpoint), or give --max-shard-size for a sharded folder",
            code="CKM531",
        )
    elif out.is_dir():
        raise CheckpointError(f"{out}: is a folder", code="CKM531")
    elif not overwrite:
        refuse_replacing(out)
    folder = out.parent
    if not folder.is_dir():
        raise CheckpointError(f"{out}: the folder {folder} does not exist", code="CKM531")
    if not os.access(folder, os.W_OK):
        raise CheckpointError(f"{out}: the folder {folder} is not writable", code="CKM532")


def parse_size(text: str) -> int:
    """'5GB', '500MB', '2GiB', '1000' -> bytes."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B?)\s*", text, re.I)
    if not m:
        raise CheckpointError(f"{text!r} is not a size like 5GB or 500MB", code="CKM535")
    unit = m.group(2).upper().rstrip("B")
    base = 1024 if unit.endswith("I") else 1000
    power = "KMGT".index(unit[0]) + 1 if unit else 0
    size = float(m.group(1)) * base**power
    if not 1 <= size < 2**63:
        raise CheckpointError(f"{text[:40]!r} is not a size a file can have", code="CKM535")
    return int(size)


def save_checkpoint(
    out: Path,
    items: list[tuple[str, TensorMeta]],
    fetch: Callable[[str], torch.Tensor | st.RawBytes],
    *,
    metadata: dict[str, str],
    aliases: dict[str, str] | None = None,
    max_shard_size: int | None = None,
    on_bytes: Callable[[int], None] | None = None,
    overwrite: bool = False,
    keep: Iterable[Path] = (),
) -> list[Path]:
    """Write the tensors named in `items` (read one at a time through `fetch`), atomically.
    `keep`: paths being read, which no clean-up may touch.

    `aliases` maps a name to the name it is tied to: stored once, restored on read.
    An existing `out` is replaced only with `overwrite`. Returns the files written.
    """
    out = Path(out)
    aliases = dict(aliases or {})
    check_destination(out, sharded=max_shard_size is not None, overwrite=overwrite)
    _clean_stale_partials(out, keep)
    if max_shard_size is not None:
        return _save_sharded(out, items, fetch, metadata, aliases, max_shard_size, on_bytes)
    if out.suffix == DCP_SUFFIX:
        return _save_dcp(out, items, fetch, on_bytes)
    tmp = None
    try:
        fd, tmp = _create_exclusive(out)
        with open(fd, "wb", buffering=0) as f:  # unbuffered: raw copies go straight to the fd
            if out.suffix == ".safetensors":
                stored = [(n, m) for n, m in items if n not in aliases]
                meta = dict(metadata)
                if aliases:
                    meta[st.ALIASES_KEY] = json.dumps(aliases, sort_keys=True)
                st.write(f, stored, fetch, meta, on_bytes)
            else:
                _write_torch(f, items, fetch, aliases, on_bytes)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, out)
        _fsync_dir(out.parent)
    except OSError as e:
        error = _write_error(out, e)  # before the partial file goes: it may be what fills the disk
        if tmp is not None:
            tmp.unlink(missing_ok=True)
        raise error from None
    except BaseException:
        if tmp is not None:
            tmp.unlink(missing_ok=True)
        raise
    return [out]


def _write_error(out: Path, e: OSError) -> CheckpointError:
    if e.errno == errno.EFAULT:  # the bytes being copied were in a file that shrank meanwhile
        return CheckpointError(
            f"{out}: not written: a source file changed or was cut short while it was read",
            code="CKM536",
        )
    why = e.strerror or str(e)
    if e.errno in (errno.EIO, None):  # a writer that did not say why (torch's zip writer)
        with contextlib.suppress(OSError):
            if shutil.disk_usage(out.parent).free < (1 << 20):  # what a writer's error hides
                why = f"No space left on device; {why}"
    return CheckpointError(f"{out}: cannot write ({why})", code="CKM532")


def _write_torch(f, items, fetch, aliases, on_bytes) -> None:
    import torch

    tensors: dict[str, torch.Tensor] = {}
    for name, _ in items:
        if name in aliases:
            continue
        tensors[name] = fetch(name)
        if on_bytes:
            on_bytes(tensors[name].numel() * tensors[name].element_size())
    for alias, stored in aliases.items():
        tensors[alias] = tensors[stored]  # torch.save keeps the sharing
    try:
        torch.save({n: tensors[n] for n, _ in items}, f)
    except RuntimeError as e:  # torch's zip writer does not say why a write failed
        first = str(e).strip().splitlines()[-1][:200] if str(e).strip() else type(e).__name__
        raise OSError(errno.EIO, first) from None


def _save_sharded(out, items, fetch, metadata, aliases, max_shard_size, on_bytes) -> list[Path]:
    stored = [(n, m) for n, m in items if n not in aliases]
    shards: list[list[tuple[str, TensorMeta]]] = [[]]
    size = 0
    for name, m in stored:
        nbytes = m.nbytes
        if shards[-1] and size + nbytes > max_shard_size:
            shards.append([])
            size = 0
        shards[-1].append((name, m))
        size += nbytes
    count = len(shards)
    names = [f"model-{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1)]
    weight_map, total = {}, 0
    with _new_folder(out) as tmp:
        for file, shard in zip(names, shards, strict=True):
            in_shard = {n for n, _ in shard}
            shard_aliases = {a: s for a, s in aliases.items() if s in in_shard}
            meta = dict(metadata)
            if shard_aliases:
                meta[st.ALIASES_KEY] = json.dumps(shard_aliases, sort_keys=True)
            with open(tmp / file, "xb", buffering=0) as f:  # a new folder of our own
                st.write(f, shard, fetch, meta, on_bytes)
                f.flush()
                os.fsync(f.fileno())
            for n, m in shard:
                weight_map[n] = file
                total += m.nbytes
        index = {"metadata": {"total_size": total, **metadata}, "weight_map": weight_map}
        with open(tmp / "model.safetensors.index.json", "w", encoding="utf-8") as f:
            json.dump(index, f, indent=2, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
    return [out / n for n in names] + [out / "model.safetensors.index.json"]


@contextlib.contextmanager
def _new_folder(out: Path) -> Iterator[Path]:
    """A folder built under a temporary name beside `out` (ordinary permissions), put in
    `out`'s place when the block ends; on any failure, removed, the error said plainly."""
    tmp = None
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}{PARTIAL}{os.getpid()}-", dir=out.parent))
        os.chmod(tmp, 0o777 & ~_umask())
        yield tmp
        _publish_folder(tmp, out)
    except OSError as e:
        error = _write_error(out, e)  # before the partial folder goes: it may fill the disk
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        raise error from None
    except BaseException:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        raise


def _publish_folder(tmp: Path, out: Path) -> None:
    """A folder written in full under a temporary name takes `out`'s place at once (a
    previous output there, checked before any work, goes after)."""
    _fsync_dir(tmp)
    old = None
    if out.exists():
        if any(out.iterdir()):
            old = out.parent / f".{out.name}{PARTIAL}{os.getpid()}-old-{os.urandom(4).hex()}"
            os.replace(out, old)
        else:
            out.rmdir()
    os.replace(tmp, out)
    _fsync_dir(out.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _save_dcp(out: Path, items, fetch, on_bytes) -> list[Path]:
    """A torch.distributed.checkpoint folder, written by DCP's own writer into a temporary
    folder that then takes `out`'s place. DCP saves a state_dict whole: the tensors are
    held together while it writes (one process; a sharded model writes its own pieces)."""
    from .dcp import save_dcp

    with _new_folder(out) as tmp:
        tensors = {}
        for name, _ in items:
            tensor = fetch(name)
            if isinstance(tensor, st.RawBytes):  # never asked for here: bytes need a tensor
                raise CheckpointError(f"{name}: raw bytes cannot go into DCP", code="CKM531")
            tensors[name] = tensor
        save_dcp(tmp, tensors)
        if on_bytes:
            on_bytes(sum(m.nbytes for _, m in items))
    return sorted(p for p in out.iterdir() if p.is_file())


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _clean_stale_partials(out: Path, keep: Iterable[Path] = ()) -> None:
    """Remove what an earlier, killed write to the same destination left behind: only names
    exactly as this writer makes them, never a path the command reads."""
    made = re.compile(
        rf"\.{re.escape(out.name)}{re.escape(PARTIAL)}(\d+)-(?:[a-z0-9_]{{8}}|old-[0-9a-f]{{8}})"
    )
    kept = {Path(p).resolve() for p in keep}
    for partial in out.parent.iterdir():
        found = made.fullmatch(partial.name)
        if found is None or partial.resolve() in kept:
            continue
        pid = found[1]
        if not _alive(int(pid)):
            if partial.is_dir() and not partial.is_symlink():
                shutil.rmtree(partial, ignore_errors=True)
            else:
                partial.unlink(missing_ok=True)  # a file, or a link (never followed)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def provenance(
    rules_fingerprint: str, plan_fingerprint: str, sources: list[Path], hash_source: bool = False
) -> dict[str, str]:
    """What the output came from: ckptmap version, rules and plan fingerprints, source identity."""
    identity = []
    for s in sources:
        entry: dict[str, object] = {"name": Path(s).name, "bytes": Path(s).stat().st_size}
        if hash_source:
            entry["sha256"] = _sha256(Path(s))
        identity.append(entry)
    return {
        "ckptmap.version": __version__,
        "ckptmap.rules_fingerprint": rules_fingerprint,
        "ckptmap.plan_fingerprint": plan_fingerprint,
        "ckptmap.source": json.dumps(identity),
    }


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def write_text_atomically(path: Path, text: str, follow: bool = False) -> None:
    """Replace a text file (a rule file, a report) with no moment where it is half written.

    An existing file keeps its permissions. `follow`: a symlink's target is rewritten (the
    rule file `fmt` was given is the one it points at); otherwise a link is replaced."""
    path = Path(path)
    if follow and path.is_symlink():
        path = path.resolve()
    tmp = None
    try:
        fd, tmp = _create_exclusive(path)
        with contextlib.suppress(FileNotFoundError):
            if not path.is_symlink():
                os.fchmod(fd, path.stat().st_mode & 0o7777)
        with open(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        if tmp is not None:
            tmp.unlink(missing_ok=True)
        raise CheckpointError(f"{path}: cannot write ({e.strerror})", code="CKM532") from None
