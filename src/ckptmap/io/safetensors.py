"""safetensors: a header read and checked on its own; tensors read lazily; a streaming writer.

The header is validated before anything trusts it: its length against the
file size, JSON, every entry's dtype, shape and byte range (inside the data,
the size its shape and dtype need, no two ranges overlapping).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
import math
import os
import struct
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from functools import cached_property
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, NamedTuple

from ..alloc import no_gc
from ..errors import CheckpointError
from ..limits import check_count, check_keys, limit
from ..meta import CODES, DTYPES, TensorMeta
from .base import Checkpoint

if TYPE_CHECKING:
    import torch


# safetensors dtype code -> (torch dtype name, bytes per element)
ALIASES_KEY = "ckptmap.aliases"  # {name: stored name} for tensors stored once (tied)
CHUNK = 64 << 20  # bytes copied between progress updates and writeback starts
PAGE = 4096  # the block size that aligned copies keep
READ_PIECE = 2 << 20  # the least one thread reads of a tensor read by several
BLOCK = 8 << 20  # bytes of a non-contiguous tensor made contiguous at a time for writing


MAX_DIM = 2**63  # a size torch can hold


class _Duplicate(ValueError):
    pass


class Entry(NamedTuple):
    """One tensor's header entry, as safetensors writes it: a tuple, not a dict (a million
    entries cost 200 MB less)."""

    dtype: Any
    shape: Any
    data_offsets: Any


_ENTRY_KEYS = ("dtype", "shape", "data_offsets")
_make_entry = tuple.__new__


def _header_object(items: list[tuple[str, Any]]) -> Any:
    """A JSON object of a header: a tensor's entry in the order safetensors writes it
    becomes an `Entry`; anything else a dict, refusing a key given twice."""
    if len(items) == 3:
        (k0, v0), (k1, v1), (k2, v2) = items
        if k0 == "dtype" and k1 == "shape" and k2 == "data_offsets":
            return _make_entry(Entry, (v0, v1, v2))
    return _no_duplicates(items)


def _no_duplicates(items: list[tuple[str, Any]]) -> dict[str, Any]:
    """A JSON object, refusing a key given twice (json.loads would keep the last, silently;
    safetensors refuses such files)."""
    out = dict(items)
    if len(out) != len(items):
        keys = [k for k, _ in items]
        raise _Duplicate(f"names {next(k for k in keys if keys.count(k) > 1)!r} twice")
    return out


def refuse_duplicate_keys(text: bytes | str, what: str) -> Any:
    """Parse JSON, refusing an object that names a key twice (CheckpointError naming it)."""

    def pairs(items: list[tuple[str, Any]]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key, value in items:
            if key in out:
                raise CheckpointError(f"{what} names {key!r} twice", code="CKM511")
            out[key] = value
        return out

    return json.loads(text, object_pairs_hook=pairs)


def read_header(path: Path) -> tuple[dict[str, Any], int]:
    """The validated header of a safetensors file, and where its data starts."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise CheckpointError(
                    f"{path}: {size} bytes, too short to be a safetensors file", code="CKM510"
                )
            (n,) = struct.unpack("<Q", raw)
            most = limit("CKPTMAP_MAX_HEADER_BYTES")
            if n > most:
                raise CheckpointError(
                    f"{path}: the header claims {n:,} bytes, over the limit of {most:,} "
                    "(not safetensors, or a hostile file)",
                    code="CKM510",
                    hint="a larger limit: CKPTMAP_MAX_HEADER_BYTES=N in the environment",
                )
            if 8 + n > size:
                raise CheckpointError(
                    f"{path}: the header claims {n} bytes but the file has {size - 8} after the "
                    "length (truncated, or not safetensors)",
                    code="CKM510",
                )
            body = f.read(n)
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read ({e.strerror})", code="CKM501") from None
    check_count(body.count(b'"data_offsets"'), str(path))  # before parsing: a bound on the work
    try:
        # decoded as json.loads would, then the bytes let go: a 100 MB header is not held
        # twice while its objects are made
        text = body.decode(json.detect_encoding(body), "surrogatepass")
        del body
        with no_gc():  # 400k objects for a 100k-tensor header: a third of the time else
            header = json.loads(text, object_pairs_hook=_header_object)
        del text
    except _Duplicate as e:
        raise CheckpointError(f"{path}: the header {e}", code="CKM511") from None
    except (UnicodeDecodeError, ValueError) as e:  # ValueError: also integers of 5,000 digits
        raise CheckpointError(
            f"{path}: the header is not valid JSON ({str(e)[:200]})", code="CKM511"
        ) from None
    except RecursionError:
        raise CheckpointError(f"{path}: the header nests too deeply", code="CKM511") from None
    if type(header) is Entry:  # three tensors named like an entry's fields
        header = dict(zip(_ENTRY_KEYS, header, strict=True))
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: the header is not a JSON object", code="CKM511")
    if type(header.get("__metadata__")) is Entry:  # metadata with an entry's three keys
        header["__metadata__"] = dict(zip(_ENTRY_KEYS, header["__metadata__"], strict=True))
    check_keys(header, str(path))
    with no_gc():  # a range per tensor, kept to the end of the checks
        _validate(path, header, size - 8 - n)
    return header, 8 + n


def _validate(path: Path, header: dict[str, Any], data_size: int) -> None:
    def bad(name: str, why: str) -> CheckpointError:
        return CheckpointError(f"{path}: tensor {name!r}: {why}", code="CKM511")

    metadata = header.get("__metadata__", {})
    if not isinstance(metadata, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
    ):
        raise CheckpointError(f"{path}: __metadata__ must map strings to strings", code="CKM511")
    ranges = []
    for name, info in header.items():
        if type(info) is not Entry:
            if name == "__metadata__":
                continue
            # written in another order, or with more fields: read as safetensors reads it
            if not isinstance(info, dict):
                raise bad(name, "its entry is not an object")
            fields = (info.get("dtype"), info.get("shape"), info.get("data_offsets"))
            info = header[name] = _make_entry(Entry, fields)
        # the common case in as few steps as possible (100k-entry headers are read in full);
        # anything off takes the slow path below, which says what is wrong
        try:
            dtype, shape, (begin, end) = info
            ok = (
                type(shape) is list
                and type(begin) is int
                and type(end) is int
                and 0 <= begin <= end <= data_size
                and end - begin == math.prod(shape) * DTYPES[dtype][1]
            )
            for d in shape if ok else ():  # a loop, not all(...): no generator per entry
                if type(d) is not int or not 0 <= d < MAX_DIM:
                    ok = False
        except (TypeError, KeyError, ValueError):
            ok = False
        if not ok:
            _explain(bad, name, info, data_size)
        ranges.append((begin, end, name))
    if any(ranges[i] > ranges[i + 1] for i in range(len(ranges) - 1)):  # usually in order
        ranges.sort()
    reach, reaching = 0, ""  # the furthest end so far, and whose it is
    for begin, end, name in ranges:
        if begin == end:  # zero-size tensors overlap nothing
            continue
        if begin < reach:
            raise CheckpointError(
                f"{path}: tensors {reaching!r} and {name!r} overlap (bytes {begin}..{reach})",
                code="CKM511",
            )
        reach, reaching = end, name


def _explain(bad: Any, name: str, info: Entry, data_size: int) -> None:
    """Raise the error that says what is wrong with one header entry."""
    dtype, shape, offsets = info
    if not isinstance(dtype, str) or dtype not in DTYPES:
        raise bad(name, f"unknown dtype {dtype!r}"[:200])
    if not isinstance(shape, list) or not all(
        isinstance(d, int) and not isinstance(d, bool) and 0 <= d < MAX_DIM for d in shape
    ):
        raise bad(name, f"shape {shape!r} is not a list of sizes below 2**63"[:200])
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
    ):
        raise bad(name, f"data_offsets {offsets!r} is not [begin, end]")
    begin, end = offsets
    if not 0 <= begin <= end:
        raise bad(name, f"data_offsets {offsets} run backwards")
    if end > data_size:
        raise bad(name, f"data_offsets {offsets} run past the end of the data ({data_size} bytes)")
    need = math.prod(shape) * DTYPES[dtype][1]
    if end - begin != need:
        raise bad(name, f"{end - begin} bytes for shape {shape} {dtype}, which needs {need}")
    raise AssertionError(f"header entry {name!r} fails the quick check but not the full one")


class SafetensorsCheckpoint(Checkpoint):
    def __init__(self, path: Path):
        super().__init__(path)
        self._cache: dict[str, Any] = {}

    @cached_property
    def _header(self) -> tuple[dict[str, Any], int]:
        return read_header(self.path)

    @property
    def header(self) -> dict[str, Any]:
        return self._header[0]

    @property
    def data_start(self) -> int:
        return self._header[1]

    @property
    def metadata(self) -> dict[str, str]:
        return self.header.get("__metadata__", {})

    @cached_property
    def aliases(self) -> dict[str, str]:
        """Tied tensors stored once: {alias: stored name}.

        Two writers say so: ckptmap (its `ckptmap.aliases` entry) and safetensors'
        `save_model`, which drops all but one name of a tied group and records each
        dropped name as a metadata entry `{dropped: kept}`, as its `load_model` reads it.
        """
        tensors = self.header
        aliases = {
            key: value
            for key, value in self.metadata.items()
            if key not in tensors and value in tensors and value != "__metadata__"
        }
        raw = self.metadata.get(ALIASES_KEY)
        if raw is None:
            return aliases
        malformed = CheckpointError(f"{self.path}: malformed {ALIASES_KEY} metadata", code="CKM511")
        try:
            ours = json.loads(raw)
        except (ValueError, RecursionError):
            raise malformed from None
        # explicit checks, not asserts: `python -O` must not let a hostile file through
        if not isinstance(ours, dict) or not all(
            isinstance(v, str) and v in tensors and v != "__metadata__" and k not in tensors
            for k, v in ours.items()
        ):
            raise malformed
        return {**aliases, **ours}

    def meta(self) -> dict[str, TensorMeta]:
        new, names = tuple.__new__, {code: name for code, (name, _) in DTYPES.items()}
        out = {  # TensorMeta made as the tuple it is (its own __new__ is a Python call)
            name: new(TensorMeta, (tuple(info[1]), names[info[0]]))
            for name, info in self.header.items()
            if name != "__metadata__"
        }
        for alias, stored in self.aliases.items():
            out[alias] = out[stored]
        return out

    def ties(self) -> dict[str, tuple[str, ...]]:
        groups: dict[str, list[str]] = {}
        for alias, stored in self.aliases.items():
            groups.setdefault(stored, [stored]).append(alias)
        return {k: tuple(sorted(g)) for g in groups.values() for k in g}

    def raw(self, name: str) -> RawBytes:
        """Where `name`'s bytes lie in the file."""
        begin, end = self.header[self.aliases.get(name, name)].data_offsets
        return RawBytes(self.path, self.data_start + begin, end - begin)

    def get(self, name: str) -> torch.Tensor:
        """Read one tensor straight into its own memory (no mmap, no second copy)."""
        import torch

        name = self.aliases.get(name, name)
        if name in self._cache:  # tied names hand back one tensor
            return self._cache[name]
        info = self.header.get(name)
        if info is None or name == "__metadata__":
            raise KeyError(name)
        tensor = torch.empty(info.shape, dtype=getattr(torch, DTYPES[info.dtype][0]))
        self.raw(name).read_into(tensor)
        if self.aliases and name in self.aliases.values():
            self._cache[name] = tensor
        return tensor


# --- raw bytes ---


class RawBytes(NamedTuple):
    """A tensor's bytes where they lie in a file: copied as they are, never decoded."""

    path: Path
    offset: int
    length: int

    def read_into(self, tensor: torch.Tensor) -> None:
        """Fill a contiguous CPU tensor of exactly this many bytes from the file.

        The kernel copies the bytes straight into the tensor's memory (a large tensor
        in one range per torch thread, at once): nothing is mapped, so no page of the
        file ever counts in the process's memory.
        """
        import torch

        if tensor.numel() == 0:
            return
        dst = tensor.view(-1).view(torch.uint8)
        if dst.numel() != self.length:
            raise CheckpointError(
                f"{self.path}: {self.length} bytes for a {dst.numel()}-byte tensor", code="CKM534"
            )
        view = dst.numpy().data
        pieces = _pieces(self.length, torch.get_num_threads())
        if len(pieces) == 1:
            self._read(view, 0, self.length)
        else:  # the kernel copies (and faults in fresh pages) on every core, as torch would
            futures = [_readers().submit(self._read, view, *p) for p in pieces]
            try:
                for future in futures:
                    future.result()
            finally:  # no piece may still be writing when the caller undoes or re-raises
                for future in futures:
                    future.cancel()
                concurrent.futures.wait(futures)

    def _read(self, view: memoryview, start: int, end: int) -> None:
        with open(self.path, "rb", buffering=0) as f:
            f.seek(self.offset + start)
            while start < end:
                n = f.readinto(view[start:end])
                if not n:
                    raise CheckpointError(f"{self.path}: ended early", code="CKM510")
                start += n

    def copy_to(self, dst: int, on_chunk: Callable[[int], None] | None = None) -> None:
        """Append the bytes to the file `dst` is open on (at its position), in the kernel,
        in pieces of at most 64 MiB, aligned to 4 KiB blocks; `on_chunk(n)` after each.

        `copy_file_range` first (it shares blocks where the filesystem can), `sendfile`
        where that is refused (another filesystem, an old kernel), then buffered reads."""
        with open(self.path, "rb", buffering=0) as src:
            fd, offset, left = src.fileno(), self.offset, self.length
            for copy in _kernel_copies(fd, dst):
                while left:
                    try:
                        done = copy(_next_piece(offset, left), offset)
                    except OSError:  # not between these files: the next way
                        break
                    if done == 0:
                        break
                    offset, left = offset + done, left - done
                    if on_chunk:
                        on_chunk(done)
                if not left:
                    return
            src.seek(offset)
            while left:  # large buffered copies where the kernel cannot help
                chunk = src.read(min(left, CHUNK))
                if not chunk:
                    raise CheckpointError(f"{self.path}: ended early", code="CKM510")
                view = memoryview(chunk)
                while view:
                    view = view[os.write(dst, view) :]
                left -= len(chunk)
                if on_chunk:
                    on_chunk(len(chunk))


# --- writing -----------------------------------------------------------------------------------


def write(
    f: IO[bytes],
    items: Iterable[tuple[str, TensorMeta]],
    fetch: Callable[[str], torch.Tensor | RawBytes],
    metadata: dict[str, str],
    on_bytes: Callable[[int], None] | None = None,
) -> None:
    """Stream tensors into a safetensors file: the header from metadata, then one tensor at a time.

    `items` are (name, meta) in the order to store them; `fetch(name)` reads a
    tensor when its turn comes, and it is released right after it is written.
    """
    items = list(items)
    header = _header(items, metadata)
    # The first tensor is fetched before the header is written: when its bytes are copied
    # as they are, the header is padded so that they keep their place within a 4 KiB block
    # (copies between aligned ranges can share the blocks on XFS and btrfs, like `cp`).
    ahead = fetch(items[0][0]) if items else None
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * _padding(len(blob), ahead.offset if isinstance(ahead, RawBytes) else None)
    f.write(struct.pack("<Q", len(blob)))
    f.write(blob)
    written = 8 + len(blob)  # where the bytes not yet handed to writeback start

    def wrote(n: int) -> None:
        nonlocal written
        _start_writeback(f.fileno(), written, n)
        written += n
        if on_bytes:
            on_bytes(n)

    i = 0
    while i < len(items):
        name, m = items[i]
        tensor = ahead if ahead is not None else fetch(name)
        ahead = None
        i += 1
        if isinstance(tensor, RawBytes):  # renamed tensors: their bytes, copied undecoded
            run = tensor  # and those lying back to back in one file, as one range
            while i < len(items):
                ahead = fetch(items[i][0])
                if not (
                    isinstance(ahead, RawBytes)
                    and ahead.path == run.path
                    and ahead.offset == run.offset + run.length
                ):
                    break
                run = RawBytes(run.path, run.offset, run.length + ahead.length)
                ahead = None
                i += 1
            f.flush()
            run.copy_to(f.fileno(), wrote)
            continue
        _write_tensor(f, name, m, tensor, wrote)
        del tensor


def _header(items: list[tuple[str, TensorMeta]], metadata: dict[str, str]) -> dict[str, Any]:
    """The header of a file storing `items` in this order (names listed sorted)."""
    entries: dict[str, Any] = {}
    offset = 0
    for name, m in items:
        if m.dtype not in CODES:
            raise CheckpointError(
                f"{name}: dtype {m.dtype} cannot be stored in safetensors", code="CKM533"
            )
        size = m.nbytes
        entries[name] = {
            "dtype": CODES[m.dtype],
            "shape": list(m.shape),
            "data_offsets": [offset, offset + size],
        }
        offset += size
    header: dict[str, Any] = {"__metadata__": dict(metadata)} if metadata else {}
    header.update(sorted(entries.items()))
    return header


def _write_tensor(
    f: IO[bytes], name: str, m: TensorMeta, tensor: torch.Tensor, wrote: Callable[[int], None]
) -> None:
    """One decoded tensor's bytes, a contiguous piece at a time (it must be what was planned)."""
    if tuple(tensor.shape) != tuple(m.shape) or str(tensor.dtype) != f"torch.{m.dtype}":
        raise CheckpointError(
            f"{name}: the tensor is {list(tensor.shape)} {tensor.dtype}, the plan said "
            f"{list(m.shape)} {m.dtype}",
            code="CKM534",
        )
    for part in _contiguous_pieces(tensor.detach().to("cpu")):
        f.write(memoryview(part))
        f.flush()
        wrote(part.nbytes)
        del part


def _kernel_copies(src: int, dst: int) -> Iterator[Callable[[int, int], int]]:
    """The ways this system copies `n` bytes at `offset` of `src` to `dst`'s position."""
    if hasattr(os, "copy_file_range"):
        yield lambda n, offset: os.copy_file_range(src, dst, n, offset)
    if hasattr(os, "sendfile"):
        yield lambda n, offset: os.sendfile(dst, src, offset, n)


def _padding(length: int, first_offset: int | None) -> int:
    """Spaces after a header of `length` bytes: to a multiple of 8, and, when the first
    tensor is copied from `first_offset` in another file, so that the data starts at the
    same place within a 4 KiB block."""
    if first_offset is None or first_offset % 8:
        return -length % 8
    return (first_offset - 8 - length) % PAGE


def _next_piece(offset: int, left: int) -> int:
    """How much of a copy from `offset` to do in one call: up to a 4 KiB boundary first,
    then whole blocks (at most CHUNK), then the tail, so that every middle piece is aligned."""
    if offset % PAGE:
        return min(left, PAGE - offset % PAGE)
    if left >= PAGE:
        return min(CHUNK, left - left % PAGE)
    return left


def _pieces(length: int, workers: int) -> list[tuple[int, int]]:
    """`length` bytes cut into block-aligned ranges, one per worker, none under READ_PIECE."""
    workers = min(workers, length // READ_PIECE)
    if workers <= 1:
        return [(0, length)]
    step = -(-length // workers // PAGE) * PAGE
    return [(a, min(a + step, length)) for a in range(0, length, step)]


_pool: tuple[int, ThreadPoolExecutor] | None = None


def _readers() -> ThreadPoolExecutor:
    """The reading threads of this process (a forked child makes its own: the parent's
    threads do not exist there)."""
    global _pool
    if _pool is None or _pool[0] != os.getpid():
        import torch

        pool = ThreadPoolExecutor(torch.get_num_threads(), thread_name_prefix="ckptmap-read")
        _pool = (os.getpid(), pool)
    return _pool[1]


def _contiguous_pieces(tensor: torch.Tensor) -> Iterator[Any]:
    """The tensor's bytes in storage order, as numpy byte arrays: a contiguous tensor as
    itself (no copy); any other (a transpose, a permute) a block of rows at a time, so
    that no whole second copy of it is ever held."""
    import torch

    if tensor.is_contiguous() or tensor.dim() == 0 or tensor.shape[0] <= 1:
        yield tensor.contiguous().reshape(-1).view(torch.uint8).numpy()
        return
    row = tensor[0].numel() * tensor.element_size()
    for block in tensor.split(max(1, BLOCK // max(row, 1))):
        yield block.contiguous().reshape(-1).view(torch.uint8).numpy()


def _start_writeback(fd: int, offset: int, length: int) -> None:
    """Have the kernel start writing these bytes to disk now, while the next are copied.

    The output is fsynced at the end anyway (atomic replace); started early, that
    fsync finds little left to do, and a many-GB output does not first fill the
    page cache with dirty pages. (Linux starts writeback of dirty pages on
    DONTNEED and drops the clean ones.)
    """
    advise = getattr(os, "posix_fadvise", None)
    if advise is not None and length:
        with contextlib.suppress(OSError):
            advise(fd, offset, length, os.POSIX_FADV_DONTNEED)
