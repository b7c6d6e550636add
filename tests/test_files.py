"""Real checkpoint files in every format, hostile files, and atomic writes, through the CLI."""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from models import GPT2LMHead, ResNet
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

import ckptmap
from ckptmap.cli import app
from ckptmap.io import open_checkpoint

runner = CliRunner(env={"COLUMNS": "200"})


def state(prefix: str = "", classes: int = 1000) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return {prefix + k: v.clone() for k, v in ResNet(classes).state_dict().items()}


def write_hf_sharded(
    folder: Path, sd: dict[str, torch.Tensor], shards: int = 3, kind="safetensors"
):
    """Shards and an index laid out the way Hugging Face's save_pretrained does."""
    folder.mkdir()
    names = sorted(sd)
    weight_map = {}
    for i in range(shards):
        part = names[i::shards]
        if kind == "safetensors":
            file = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
            save_file({k: sd[k] for k in part}, folder / file, metadata={"format": "pt"})
        else:
            file = f"pytorch_model-{i + 1:05d}-of-{shards:05d}.bin"
            torch.save({k: sd[k] for k in part}, folder / file)
        weight_map |= {k: file for k in part}
    index = (
        "model.safetensors.index.json" if kind == "safetensors" else "pytorch_model.bin.index.json"
    )
    (folder / index).write_text(
        json.dumps({"metadata": {"total_size": 0}, "weight_map": weight_map})
    )
    return folder


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# --- every format, end to end ---------------------------------------------------------------


@pytest.mark.parametrize(
    "fmt", ["safetensors", "pt", "legacy-pt", "sharded-safetensors", "sharded-bin", "nested-pt"]
)
def test_apply_reads_every_format(fmt, tmp_path, ddp_rules):
    sd = state("module.")
    if fmt == "safetensors":
        source = tmp_path / "m.safetensors"
        save_file(sd, source)
    elif fmt == "pt":
        source = tmp_path / "m.pt"
        torch.save(sd, source)
    elif fmt == "legacy-pt":
        source = tmp_path / "m.pth"
        torch.save(sd, source, _use_new_zipfile_serialization=False)
    elif fmt == "nested-pt":
        source = tmp_path / "checkpoint.pt"
        torch.save({"epoch": 90, "state_dict": sd, "optimizer": {"lr": 0.1}}, source)
    else:
        source = write_hf_sharded(tmp_path / "hf", sd, kind=fmt.split("-")[1])
    out = tmp_path / "out.safetensors"
    result = runner.invoke(app, ["apply", ddp_rules, "-s", str(source), "-o", str(out)])
    assert result.exit_code == 0, result.output
    got = load_file(out)
    assert got.keys() == {k.removeprefix("module.") for k in sd}
    for k, v in sd.items():
        assert torch.equal(got[k.removeprefix("module.")], v)
    if fmt == "nested-pt":
        assert "note: weights taken from 'state_dict'" in result.output
        assert "'optimizer' (dict) left out" in result.output


def test_select_and_ambiguity(tmp_path, ddp_rules):
    source = tmp_path / "train.pt"
    torch.save({"model": state("module."), "ema": state("module.")}, source)
    result = runner.invoke(app, ["inspect", str(source)])
    assert result.exit_code == 2
    assert "several sets of weights inside (model, ema); choose one with --select" in result.output
    result = runner.invoke(app, ["inspect", str(source), "--select", "ema"])
    assert result.exit_code == 0 and "note: weights taken from 'ema'" in result.output


def test_write_pt_and_sharded_output(tmp_path, ddp_rules):
    source = tmp_path / "m.safetensors"
    sd = state("module.")
    save_file(sd, source)
    pt = tmp_path / "out.pt"
    assert runner.invoke(app, ["apply", ddp_rules, "-s", str(source), "-o", str(pt)]).exit_code == 0
    assert torch.load(pt, weights_only=True).keys() == {k[7:] for k in sd}
    folder = tmp_path / "sharded"
    result = runner.invoke(
        app, ["apply", ddp_rules, "-s", str(source), "-o", str(folder), "--max-shard-size", "200KB"]
    )
    assert result.exit_code == 0, result.output
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    per_file = {f: [k for k, v in index["weight_map"].items() if v == f] for f in files}
    assert len(files) > 1
    for f, keys in per_file.items():  # a tensor larger than the limit gets a shard of its own
        assert (folder / f).stat().st_size <= 200_000 + 8192 or len(keys) == 1
    reread = open_checkpoint(folder)
    assert reread.meta().keys() == {k[7:] for k in sd}
    assert torch.equal(reread.get("conv1.weight"), sd["module.conv1.weight"])
    assert index["metadata"]["ckptmap.plan_fingerprint"].startswith("sha256:")


def test_tied_tensors_are_stored_once_and_restored(tmp_path):
    model = GPT2LMHead()
    source = tmp_path / "gpt2.pt"
    torch.save(model.state_dict(), source)  # lm_head.weight and wte.weight share storage
    out = tmp_path / "gpt2.safetensors"
    rules = tmp_path / "empty.ckmap"
    rules.write_text("")
    result = runner.invoke(app, ["apply", str(rules), "-s", str(source), "-o", str(out)])
    assert result.exit_code == 0, result.output
    from safetensors import safe_open

    with safe_open(out, "pt") as f:
        stored = list(f.keys())
        assert "lm_head.weight" not in stored
        assert json.loads(f.metadata()["ckptmap.aliases"]) == {
            "lm_head.weight": "transformer.wte.weight"
        }
    reread = open_checkpoint(out)
    assert reread.get("lm_head.weight") is reread.get("transformer.wte.weight")
    fresh = GPT2LMHead()
    report = ckptmap.load_into(fresh, out, "")
    assert not report.missing
    assert torch.equal(fresh.lm_head.weight, model.lm_head.weight)


def test_provenance_with_source_hash(tmp_path, ddp_rules):
    source = tmp_path / "m.safetensors"
    save_file(state("module."), source)
    out = tmp_path / "out.safetensors"
    runner.invoke(app, ["apply", ddp_rules, "-s", str(source), "-o", str(out), "--hash-source"])
    from safetensors import safe_open

    with safe_open(out, "pt") as f:
        meta = f.metadata()
    assert meta["ckptmap.version"] == ckptmap.__version__
    assert json.loads(meta["ckptmap.source"])[0]["sha256"] == sha(source)


def test_targets_from_checkpoint_json_and_factory(tmp_path, ddp_rules):
    source = tmp_path / "m.safetensors"
    save_file(state("module."), source)
    target_ckpt = tmp_path / "t.safetensors"
    save_file(state(classes=1000), target_ckpt)
    for target in (str(target_ckpt), "models:StagedResNet"):
        result = runner.invoke(app, ["plan", ddp_rules, "-s", str(source), "-t", target])
        expected = 0 if target.endswith(".safetensors") else 1
        assert result.exit_code == expected, result.output
    result = runner.invoke(app, ["plan", ddp_rules, "-s", str(source), "-t", "models:Nope"])
    assert result.exit_code == 2 and "cannot import the factory" in result.output


def test_diff(tmp_path):
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    save_file(state(), a)
    sd = state(classes=5)
    sd["extra.weight"] = torch.zeros(2)
    del sd["layer1.0.conv1.weight"]
    save_file(sd, b)
    result = runner.invoke(app, ["diff", str(a), str(b)])
    assert result.exit_code == 1
    assert "only in a.safetensors (1):\n  layer1.0.conv1.weight" in result.output
    assert "only in b.safetensors (1):\n  extra.weight" in result.output
    assert "fc.weight  [1000, 64] float32 -> [5, 64] float32" in result.output
    assert runner.invoke(app, ["diff", str(a), str(a)]).exit_code == 0


# --- hostile inputs: one line, exit status 2, nothing runs ---------------------------------------


def _safetensors_bytes(header: dict, data: bytes) -> bytes:
    blob = json.dumps(header).encode()
    return struct.pack("<Q", len(blob)) + blob + data


def hostile_files(tmp_path: Path) -> dict[str, Path]:
    files = {}
    good = tmp_path / "good.safetensors"
    save_file({"w": torch.ones(4)}, good)
    files["truncated"] = tmp_path / "truncated.safetensors"
    files["truncated"].write_bytes(good.read_bytes()[:30])
    files["garbage header"] = tmp_path / "garbage.safetensors"
    files["garbage header"].write_bytes(struct.pack("<Q", 10) + b"{not json}" + b"\0" * 16)
    files["offsets past the end"] = tmp_path / "past.safetensors"
    files["offsets past the end"].write_bytes(
        _safetensors_bytes(
            {"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, b"\0" * 8
        )
    )
    files["overlapping offsets"] = tmp_path / "overlap.safetensors"
    files["overlapping offsets"].write_bytes(
        _safetensors_bytes(
            {
                "a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},
                "b": {"dtype": "F32", "shape": [4], "data_offsets": [8, 24]},
            },
            b"\0" * 24,
        )
    )
    outside = tmp_path / "outside"
    outside.mkdir()
    save_file({"w": torch.ones(1)}, tmp_path / "secret.safetensors")
    (outside / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"w": "../secret.safetensors"}})
    )
    files["index pointing outside"] = outside
    absolute = tmp_path / "absolute"
    absolute.mkdir()
    (absolute / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"w": str(tmp_path / "secret.safetensors")}})
    )
    files["index with an absolute path"] = absolute
    files["code-execution pickle"] = tmp_path / "evil.pt"
    torch.save({"w": torch.ones(1), "x": Payload()}, files["code-execution pickle"])
    files["missing file"] = tmp_path / "nope.safetensors"
    noindex = tmp_path / "noindex"
    noindex.mkdir()
    (noindex / "README.md").write_text("hi")
    files["folder with no index"] = noindex
    files["not a checkpoint"] = tmp_path / "notes.txt"
    files["not a checkpoint"].write_text("hello there, this is text")
    return files


class Payload:
    def __reduce__(self):
        return (os.system, ("touch PWNED",))


@pytest.mark.parametrize(
    "case",
    [
        "truncated",
        "garbage header",
        "offsets past the end",
        "overlapping offsets",
        "index pointing outside",
        "index with an absolute path",
        "code-execution pickle",
        "missing file",
        "folder with no index",
        "not a checkpoint",
    ],
)
@pytest.mark.parametrize("command", ["inspect", "plan"])
def test_hostile_inputs_end_in_one_line_and_status_2(
    case, command, tmp_path, monkeypatch, ddp_rules
):
    monkeypatch.chdir(tmp_path)
    path = hostile_files(tmp_path)[case]
    args = ["inspect", str(path)] if command == "inspect" else ["plan", ddp_rules, "-s", str(path)]
    result = runner.invoke(app, args)
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error[CKM5"), result.output
    assert "Traceback" not in result.output
    assert not (tmp_path / "PWNED").exists()


def test_unwritable_destination(tmp_path, ddp_rules):
    source = tmp_path / "m.safetensors"
    save_file(state("module."), source)
    result = runner.invoke(
        app, ["apply", ddp_rules, "-s", str(source), "-o", str(tmp_path / "no" / "x.safetensors")]
    )
    assert result.exit_code == 2 and "does not exist" in result.output
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    # root may write anywhere a mode allows; sysfs refuses new files even to root
    dest = locked if not os.access(locked, os.W_OK) else Path("/sys")
    try:
        result = runner.invoke(
            app, ["apply", ddp_rules, "-s", str(source), "-o", str(dest / "x.safetensors")]
        )
        assert result.exit_code == 2, result.output
        assert (
            "not writable" in result.output or "cannot write (Permission denied)" in result.output
        )
        assert result.output.count("\n") == 1
    finally:
        locked.chmod(0o700)


def test_output_may_not_be_the_source(tmp_path, ddp_rules):
    folder = write_hf_sharded(tmp_path / "hf", state("module."))
    before = {p.name: sha(p) for p in folder.iterdir()}
    for out in (folder, folder / "model-00001-of-00003.safetensors", folder / "new.safetensors"):
        result = runner.invoke(app, ["apply", ddp_rules, "-s", str(folder), "-o", str(out)])
        assert result.exit_code == 2 and "refusing to write over the source" in result.output
    assert {p.name: sha(p) for p in folder.iterdir()} == before


@pytest.mark.slow
def test_killed_apply_leaves_nothing_at_the_destination(tmp_path, ddp_rules):
    source = tmp_path / "big.safetensors"
    save_file({f"module.layers.{i}.weight": torch.randn(1024, 1024) for i in range(96)}, source)
    before = sha(source)
    out = tmp_path / "out.safetensors"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "ckptmap.cli",
            "apply",
            ddp_rules,
            "-s",
            str(source),
            "-o",
            str(out),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 120
    partial = []
    while time.monotonic() < deadline and proc.poll() is None:
        partial = [
            p for p in tmp_path.glob(".out.safetensors.ckptmap-partial-*") if p.stat().st_size > 0
        ]
        if partial:
            break
        time.sleep(0.002)
    assert partial, "the write finished before it could be interrupted"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not out.exists()
    assert sha(source) == before
    # the next write to the same place cleans up what the killed one left
    result = runner.invoke(app, ["apply", ddp_rules, "-s", str(source), "-o", str(out)])
    assert result.exit_code == 0 and out.exists()
    assert not list(tmp_path.glob(".out.safetensors.ckptmap-partial-*"))


def test_write_plan_reports_every_byte_and_reads_one_tensor_at_a_time(tmp_path):
    from ckptmap.apply import write_plan

    source = tmp_path / "m.safetensors"
    sd = state("module.")
    save_file(sd, source)
    ckpt = open_checkpoint(source)
    reads = []
    original_get = ckpt.get
    ckpt.get = lambda name: reads.append(name) or original_get(name)
    total = sum(v.numel() * v.element_size() for v in sd.values())

    # renames only: every tensor's bytes are copied undecoded, none is read as a tensor
    plan = ckptmap.compile('strip "module."').plan(ckpt)
    seen = []
    write_plan(plan, ckpt, tmp_path / "renamed.safetensors", metadata={}, on_bytes=seen.append)
    assert sum(seen) == total and reads == []
    renamed = load_file(tmp_path / "renamed.safetensors")
    assert all(torch.equal(renamed[k[7:]], v) for k, v in sd.items())

    # with a transform: each tensor read exactly once
    plan = ckptmap.compile('strip "module."\ntransform "**" | reshape([-1])').plan(ckpt)
    seen.clear()
    write_plan(plan, ckpt, tmp_path / "flat.safetensors", metadata={}, on_bytes=seen.append)
    assert sum(seen) == total
    assert sorted(reads) == sorted(sd)


@pytest.mark.parametrize("kernel_copy", ["copy_file_range", "sendfile", None])
def test_raw_copies_go_in_aligned_pieces_with_progress_for_each(tmp_path, monkeypatch, kernel_copy):
    """Renamed tensors lying back to back are copied as one range, in pieces (in the kernel,
    or by buffered reads where it cannot help), each middle piece whole blocks; the header is
    padded so the data keeps its place within a block. The bytes are the source's."""
    import struct

    import ckptmap.io.safetensors as st_io
    from ckptmap.apply import write_plan

    monkeypatch.setattr(st_io, "CHUNK", 96)
    monkeypatch.setattr(st_io, "PAGE", 16)
    calls = []
    for way in ("copy_file_range", "sendfile"):
        if way != kernel_copy:
            monkeypatch.delattr(st_io.os, way, raising=False)
        elif hasattr(os, way):
            real = getattr(os, way)
            monkeypatch.setattr(st_io.os, way, lambda *a, real=real: calls.append(1) or real(*a))
    sd = {"module.a": torch.arange(60, dtype=torch.float32), "module.b": torch.ones(3)}
    source = tmp_path / "m.safetensors"
    save_file(sd, source)
    ckpt = open_checkpoint(source)
    seen = []
    out = tmp_path / "o.safetensors"
    plan = ckptmap.compile('strip "module."').plan(ckpt)
    write_plan(plan, ckpt, out, metadata={}, on_bytes=seen.append)
    assert sum(seen) == 252 and max(seen) <= 96
    assert bool(calls) == (kernel_copy is not None and hasattr(os, kernel_copy))
    if calls:
        assert all(n % 16 == 0 for n in seen[1:-1]), seen
    (n,) = struct.unpack("<Q", out.read_bytes()[:8])
    assert (8 + n) % 16 == ckpt.data_start % 16 and n % 8 == 0
    got = load_file(out)
    assert torch.equal(got["a"], sd["module.a"]) and torch.equal(got["b"], sd["module.b"])


@pytest.mark.skipif(not hasattr(os, "posix_fadvise"), reason="no posix_fadvise here")
def test_every_written_byte_is_handed_to_writeback(tmp_path, monkeypatch):
    """Each piece is passed to the kernel's writeback as it is written (copied or computed),
    so the ranges advised tile the data section exactly."""
    from ckptmap.apply import write_plan

    advised = []
    real = os.posix_fadvise
    monkeypatch.setattr(
        os, "posix_fadvise", lambda fd, o, n, a: advised.append((o, n)) or real(fd, o, n, a)
    )
    sd = {"module.a": torch.arange(60.0), "module.b": torch.ones(4, 3)}
    source = tmp_path / "m.safetensors"
    save_file(sd, source)
    ckpt = open_checkpoint(source)
    out = tmp_path / "o.safetensors"
    plan = ckptmap.compile('strip "module."\ntransform "b" | transpose(0, 1)').plan(ckpt)
    write_plan(plan, ckpt, out, metadata={})
    (n,) = struct.unpack("<Q", out.read_bytes()[:8])
    advised.sort()
    assert advised[0][0] == 8 + n
    assert all(o + k == nxt for (o, k), (nxt, _) in itertools.pairwise(advised))
    assert advised[-1][0] + advised[-1][1] == out.stat().st_size


def test_renamed_tensors_are_copied_in_storage_order_as_one_range(tmp_path, monkeypatch):
    """Whatever order names sort in, tensors copied as they are keep the order they lie in
    the source (the header still lists names in order): a pure rename is one range copy."""
    from ckptmap.apply import write_plan
    from ckptmap.io.safetensors import RawBytes

    sd = {"a": torch.arange(7.0), "b": torch.ones(2, 3), "c": torch.zeros(5, dtype=torch.int64)}
    first = tmp_path / "first.safetensors"
    save_file(sd, first)
    renamed = tmp_path / "renamed.safetensors"  # stored a, b, c; now named z, b, x
    ckpt = open_checkpoint(first)
    plan = ckptmap.compile('rename "a" -> "z"\nrename "c" -> "x"').plan(ckpt)
    write_plan(plan, ckpt, renamed, metadata={})
    assert list(open_checkpoint(renamed).meta()) == ["b", "x", "z"]

    copies = []
    original = RawBytes.copy_to
    monkeypatch.setattr(
        RawBytes, "copy_to", lambda self, *a: copies.append(self.length) or original(self, *a)
    )
    ckpt = open_checkpoint(renamed)
    plan = ckptmap.compile('rename "{x}" -> "m.{x}"').plan(ckpt)
    write_plan(plan, ckpt, tmp_path / "again.safetensors", metadata={})
    assert copies == [28 + 24 + 40]  # z (was a), b, x (was c): one range
    got = load_file(tmp_path / "again.safetensors")
    assert torch.equal(got["m.z"], sd["a"]) and torch.equal(got["m.b"], sd["b"])
    assert torch.equal(got["m.x"], sd["c"])


@pytest.mark.parametrize(
    ("merge", "gathered"),
    [("cat(0)", True), ("cat(-2)", True), ("stack(0)", True), ("cat(1)", False)],
)
def test_merged_sources_are_read_into_their_place(tmp_path, monkeypatch, merge, gathered):
    """A cat/stack along the first dimension reads each source straight into its slice of
    the result (the group is held once); a transposed output is written a block of rows
    at a time. Either way the file holds exactly what the in-memory path computes."""
    import ckptmap.io.safetensors as st_io
    from ckptmap.apply import write_plan

    monkeypatch.setattr(st_io, "BLOCK", 64)  # several blocks per transposed tensor
    torch.manual_seed(0)
    sd = {f"l.{i}.{p}": torch.randn(6, 5).to(torch.bfloat16) for i in range(2) for p in "qkv"}
    source = tmp_path / "m.safetensors"
    save_file(sd, source)
    text = (
        f'merge "l.{{i}}.q", "l.{{i}}.k", "l.{{i}}.v" -> "l.{{i}}.qkv" | {merge} | transpose(0, 1)'
    )
    program = ckptmap.compile(text)
    expected = program.plan(sd).apply(sd)
    ckpt = open_checkpoint(source)
    reads = []
    original_get = ckpt.get
    ckpt.get = lambda name: reads.append(name) or original_get(name)
    write_plan(program.plan(ckpt), ckpt, tmp_path / "o.safetensors", metadata={})
    assert (reads == []) is gathered
    got = load_file(tmp_path / "o.safetensors")
    assert got.keys() == expected.keys()
    for k, v in expected.items():
        assert got[k].dtype == v.dtype and torch.equal(got[k], v), k


def test_streaming_output_equals_the_in_memory_path(tmp_path):
    """File to file (streamed, raw copies, shards) gives exactly what Plan.apply gives in memory."""
    from ckptmap.apply import write_plan

    torch.manual_seed(0)
    sd = {
        f"model.layers.{i}.{p}": torch.randn(8, 8).to(torch.bfloat16)
        for i in range(3)
        for p in "qkv"
    }
    sd |= {f"model.layers.{i}.norm": torch.randn(8) for i in range(3)}
    source = tmp_path / "m.safetensors"
    save_file(sd, source)
    text = (
        'merge "model.layers.{i}.q", "model.layers.{i}.k", "model.layers.{i}.v" -> '
        '"blocks.{i}.qkv" | cat(0) | transpose(0, 1)\n'
        'rename "model.layers.{i}.norm" -> "blocks.{i}.norm"\n'
    )
    program = ckptmap.compile(text)
    in_memory = program.plan(sd).apply(sd)
    ckpt = open_checkpoint(source)
    plan = program.plan(ckpt)
    for out in (tmp_path / "one.safetensors", tmp_path / "sharded"):
        write_plan(plan, ckpt, out, metadata={}, max_shard_size=300 if out.suffix == "" else None)
        streamed = open_checkpoint(out)
        assert streamed.meta().keys() == in_memory.keys()
        for k, v in in_memory.items():
            got = streamed.get(k)
            assert got.dtype == v.dtype and torch.equal(got, v.contiguous()), k


def test_apply_reverse_restores_the_original_layout(tmp_path):
    from models import GQAModel

    torch.manual_seed(0)
    original = tmp_path / "original.safetensors"
    sd = GQAModel(fused=False).state_dict()
    save_file(sd, original)
    rules = str(Path(__file__).resolve().parents[1] / "rules" / "qkv-fuse.ckmap")
    fused = tmp_path / "fused.safetensors"
    assert (
        runner.invoke(app, ["apply", rules, "-s", str(original), "-o", str(fused)]).exit_code == 0
    )

    tuned = load_file(fused)  # "fine-tune": change every weight, add a new head
    tuned = {k: v + 1 for k, v in tuned.items()} | {"head.weight": torch.zeros(2, 2)}
    save_file(tuned, tmp_path / "tuned.safetensors")
    back = tmp_path / "back.safetensors"
    result = runner.invoke(
        app,
        [
            "apply",
            rules,
            "--reverse",
            "-s",
            str(tmp_path / "tuned.safetensors"),
            "--original",
            str(original),
            "-o",
            str(back),
        ],
    )
    assert result.exit_code == 0, result.output
    assert "note: left out, not from the original: head.weight" in result.output
    restored = load_file(back)
    assert restored.keys() == sd.keys()
    assert all(torch.equal(restored[k], sd[k] + 1) for k in sd)

    result = runner.invoke(app, ["apply", rules, "--reverse", "-s", str(fused), "-o", str(back)])
    assert result.exit_code == 2 and "--original" in result.output


def test_apply_reverse_refuses_lossy_steps(tmp_path):
    source = tmp_path / "m.safetensors"
    save_file({"w": torch.randn(4, 4), "b": torch.randn(4)}, source)
    rules = tmp_path / "r.ckmap"
    rules.write_text('transform "w" | cast(bfloat16)\nskip "b"\n')
    out = tmp_path / "out.safetensors"
    assert (
        runner.invoke(app, ["apply", str(rules), "-s", str(source), "-o", str(out)]).exit_code == 0
    )
    back = tmp_path / "back.safetensors"
    args = [
        "apply",
        str(rules),
        "--reverse",
        "-s",
        str(out),
        "--original",
        str(source),
        "-o",
        str(back),
    ]
    result = runner.invoke(app, args)
    assert result.exit_code == 1 and "cannot be reversed exactly" in result.output
    assert (
        "cast float32 -> bfloat16 narrows" in result.output
        and "b cannot be restored" in result.output
    )
    assert not back.exists()
    result = runner.invoke(app, [*args, "--allow-lossy"])
    assert result.exit_code == 0, result.output
    assert load_file(back)["w"].dtype == torch.float32
