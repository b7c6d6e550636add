"""Fuzzing the front doors: rule files (mutated shipped files), safetensors headers, torch
zips and shard indexes. Any exception but a CkptmapError fails, and every example finishes
within hypothesis's deadline (two seconds)."""

from __future__ import annotations

import io
import json
import struct
import zipfile
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import ckptmap
from ckptmap.io import open_checkpoint
from ckptmap.shipped import shipped_rules

FUZZ = settings(
    max_examples=150,
    deadline=2000,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


def _only_ours(call) -> None:
    try:
        call()
    except ckptmap.CkptmapError as e:
        e.render()


# --- rule files: the shipped ones, mutated -------------------------------------------------------

SHIPPED = {name: path.read_text() for name, path in shipped_rules().items()}
KEYS = {
    "module.layer1.0.conv1.weight": [8, 8, 3, 3],
    "transformer.h.0.attn.c_attn.weight": [16, 48],
    "model.layers.0.self_attn.q_proj.weight": [16, 16],
    "fc.weight": [10, 8],
    "w": [],
}


@st.composite
def mutated(draw):
    text = draw(st.sampled_from(sorted(SHIPPED.values())))
    for _ in range(draw(st.integers(1, 6))):
        at = draw(st.integers(0, len(text)))
        kind = draw(st.sampled_from(["insert", "delete", "replace"]))
        piece = draw(st.sampled_from(['"', "/", "{", "}", "|", "(", ")", "[", "]", "->", ",", "*",
                                      "**", "\n", " ", "#", "\\", "\f", "0", "-1", "99999999999",
                                      "x", "optional ", "on unused ", "merge ", "split "]))  # fmt: skip
        if kind == "insert":
            text = text[:at] + piece + text[at:]
        elif kind == "delete":
            text = text[:at] + text[at + len(piece) :]
        else:
            text = text[:at] + piece + text[at + len(piece) :]
    return text


@given(mutated())
@FUZZ
def test_mutated_rule_files_raise_only_ckptmap_errors(text):
    def run():
        ckptmap.compile(text).plan(KEYS)

    _only_ours(run)


@given(mutated())
@FUZZ
def test_fmt_of_any_parsable_mutation_keeps_its_meaning(text):
    from ckptmap.syntax import format_text

    try:
        before = ckptmap.parse(text)
    except ckptmap.CkptmapError:
        return
    once = format_text(text)
    assert ckptmap.parse(once) == before
    assert format_text(once) == once


# --- safetensors headers ------------------------------------------------------------------------

sizes = st.one_of(
    st.integers(0, 4), st.integers(-3, -1), st.just(2**63), st.just(2**70), st.booleans(),
    st.floats(allow_nan=True), st.text(max_size=3), st.none(), st.lists(st.integers(0, 2), max_size=2),
)  # fmt: skip
entries = st.fixed_dictionaries(
    {},
    optional={
        "dtype": st.one_of(st.sampled_from(["F32", "BF16", "I64", "BOOL", "F8_E4M3", "X"]), sizes),
        "shape": st.one_of(st.lists(sizes, max_size=3), sizes),
        "data_offsets": st.one_of(st.lists(sizes, max_size=3), sizes),
    },
)
names = st.one_of(st.text(max_size=8), st.sampled_from(["__metadata__", "", ".", "a..b", "[/]"]))
metadata = st.dictionaries(
    st.sampled_from(["format", "ckptmap.aliases", "x"]),
    st.one_of(st.text(max_size=10), st.sampled_from(['{"a": "b"}', '{"a": "__metadata__"}', "[[["])),
    max_size=2,
)  # fmt: skip


@st.composite
def safetensors_files(draw):
    header = draw(st.dictionaries(names, entries, max_size=4))
    if draw(st.booleans()):
        header["__metadata__"] = draw(metadata)
    raw = json.dumps(header).encode()
    if draw(st.booleans()):  # damage the bytes themselves
        at = draw(st.integers(0, max(len(raw) - 1, 0)))
        raw = raw[:at] + draw(st.binary(max_size=3)) + raw[at + 1 :]
    length = draw(st.one_of(st.just(len(raw)), st.integers(0, 2**64 - 1)))
    return struct.pack("<Q", length) + raw + draw(st.binary(max_size=64))


@given(safetensors_files())
@FUZZ
def test_safetensors_headers_raise_only_ckptmap_errors(tmp_path_factory, data):
    path = tmp_path_factory.mktemp("st") / "x.safetensors"
    path.write_bytes(data)

    def run():
        ckpt = open_checkpoint(path)
        ckpt.meta()
        ckptmap.compile("").plan(ckpt)

    _only_ours(run)


# --- torch zips, with bytes changed -------------------------------------------------------------


def _torch_bytes() -> bytes:
    buffer = io.BytesIO()
    torch.save(
        {"a": torch.arange(6.0).reshape(2, 3), "b": torch.ones(4, dtype=torch.int64)}, buffer
    )
    return buffer.getvalue()


TORCH_BYTES = _torch_bytes()


@given(
    st.lists(
        st.tuples(st.integers(0, len(TORCH_BYTES) - 1), st.integers(0, 255)), min_size=1, max_size=8
    )
)
@FUZZ
def test_damaged_torch_files_raise_only_ckptmap_errors(tmp_path_factory, flips):
    data = bytearray(TORCH_BYTES)
    for at, byte in flips:
        data[at] = byte
    path = tmp_path_factory.mktemp("pt") / "x.pt"
    path.write_bytes(bytes(data))

    def run():
        new_sd, _ = ckptmap.migrate(path, "")
        for t in new_sd.values():  # what is read must be what the file's records hold
            assert isinstance(t, torch.Tensor)

    _only_ours(run)


# --- shard indexes ------------------------------------------------------------------------------


@given(
    st.one_of(
        st.dictionaries(
            st.sampled_from(["weight_map", "metadata", "x"]),
            st.one_of(
                st.dictionaries(names, st.one_of(st.text(max_size=12), sizes), max_size=3),
                sizes,
            ),
            max_size=3,
        ),
        sizes,
    )
)
@FUZZ
def test_shard_indexes_raise_only_ckptmap_errors(tmp_path_factory, index):
    folder = tmp_path_factory.mktemp("hf")
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(2)}, folder / "model-00001-of-00001.safetensors")
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    _only_ours(lambda: ckptmap.compile("").plan(open_checkpoint(folder)))


def test_a_zip_that_is_not_a_torch_file(tmp_path):
    path = tmp_path / "x.pt"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("hello.txt", "hi")
    with pytest.raises(ckptmap.CkptmapError):
        open_checkpoint(path).meta()
    assert isinstance(path, Path)
