"""Peak memory bounds that do not depend on timing, each measured in a fresh process."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file, save_file

TENSORS, ROWS, COLS = 24, 1024, 2048  # 24 tensors of 8 MiB: 192 MiB
MIB = 2**20

CHILD = textwrap.dedent(
    """
    import json, sys
    import torch
    from torch import nn
    import ckptmap
    from ckptmap.io import open_checkpoint

    def peak():
        # VmHWM, not ru_maxrss: on Linux ru_maxrss survives exec, so a child would start
        # from the peak of the (large) test process that spawned it
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024

    what, path, out = sys.argv[1], sys.argv[2], sys.argv[3]
    if what == "write":  # as the `ckptmap` command runs it
        from ckptmap.cli import _give_back_freed_tensors
        _give_back_freed_tensors()
    tensors, rows, cols = int(sys.argv[4]), int(sys.argv[5]), int(sys.argv[6])
    def build():
        with torch.device("meta"):
            model = nn.ModuleDict({f"l{i}": nn.Linear(cols, rows, bias=False) for i in range(tensors)})
        return model.to_empty(device="cpu")

    if what.startswith("load_into"):
        floor = peak()  # interpreter, torch, ckptmap
        model = build()  # what the model itself costs once its memory is written
        with torch.no_grad():
            for p in model.parameters():
                p.fill_(1.0)
        before = floor + (peak() - floor)
        del model, p
        model = build()
        with torch.no_grad():  # an initialized model, as models usually are
            for p in model.parameters():
                p.fill_(2.0)
        ckptmap.load_into(model, path, 'strip "module."', transactional=what == "load_into")
    else:
        program = ckptmap.compile(open(out + ".ckmap").read())
        ckpt = open_checkpoint(path)
        plan = program.plan(ckpt)
        before = peak()
        from ckptmap.apply import write_plan
        write_plan(plan, ckpt, out, metadata={})
    print(json.dumps({"before": before, "after": peak()}))
    """
)

pytestmark = pytest.mark.slow  # child processes: seconds each


def run_child(what, path, out):
    args = [
        sys.executable,
        "-c",
        CHILD,
        what,
        str(path),
        str(out),
        str(TENSORS),
        str(ROWS),
        str(COLS),
    ]
    result = subprocess.run(args, capture_output=True, text=True, check=True)
    return json.loads(result.stdout)


def make_checkpoint(tmp_path):
    path = tmp_path / "big.safetensors"
    save_file({f"module.l{i}.weight": torch.randn(ROWS, COLS) for i in range(TENSORS)}, path)
    return path


def test_load_into_holds_no_whole_state_dict(tmp_path):
    """Peak: the floor, the model itself, about one tensor more; never a second checkpoint.
    A transactional load (the default) adds its undo copy: the model's size once."""
    path = make_checkpoint(tmp_path)
    largest = ROWS * COLS * 4
    m = run_child("load_into_lean", path, tmp_path / "unused")
    # `before` is the floor plus a filled model of the same size (then freed): loading a
    # second model from the file may add at most two tensors on top of that
    assert m["after"] - m["before"] <= 2 * largest + 16 * MIB, m
    m = run_child("load_into", path, tmp_path / "unused")
    undo = TENSORS * largest
    assert m["after"] - m["before"] <= undo + 2 * largest + 16 * MIB, m
    assert m["after"] - m["before"] >= undo // 2, m  # the copy is really made


def test_file_to_file_streams_one_tensor_at_a_time(tmp_path):
    path = make_checkpoint(tmp_path)
    pt = tmp_path / "big.pt"  # read through torch.load(mmap=True): pages dropped after use
    torch.save(load_file(path), pt)
    largest = ROWS * COLS * 4
    for source in (path, pt):
        for rules in ('strip "module."', 'strip "module."\ntransform "**" | transpose(0, 1)'):
            out = tmp_path / "out.safetensors"
            (tmp_path / "out.safetensors.ckmap").write_text(rules)
            m = run_child("write", source, out)
            assert m["after"] - m["before"] <= 2 * largest + 16 * MIB, (source.name, rules, m)
            out.unlink()


def test_a_merge_holds_its_group_once(tmp_path):
    """q, k, v are read from the file straight into their places in the fused tensor: the
    group is held once (reading the pieces and then concatenating would hold it twice)."""
    path = tmp_path / "qkv.safetensors"
    save_file(
        {f"module.l{i}.{p}": torch.randn(ROWS, COLS) for i in range(TENSORS // 3) for p in "qkv"},
        path,
    )
    out = tmp_path / "out.safetensors"
    (tmp_path / "out.safetensors.ckmap").write_text(
        'merge "module.l{i}.q", "module.l{i}.k", "module.l{i}.v" -> "l{i}.qkv" | cat(0)\n'
    )
    m = run_child("write", path, out)
    largest = ROWS * COLS * 4
    assert m["after"] - m["before"] <= 3 * largest + largest + 8 * MIB, m  # group + one
