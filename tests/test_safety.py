"""Nothing lost under failure: inputs are never written, a failed load leaves the model as it
was, hostile input is refused in one line. docs/safety.md names the test behind each promise.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from ckptmap.cli import app

runner = CliRunner(env={"COLUMNS": "200"})


def _run(*args, status: int | None = None) -> str:
    result = runner.invoke(app, [str(a) for a in args])
    if status is not None:
        assert result.exit_code == status, result.output
    return result.output


def _digest(path: Path) -> str:
    if path.is_dir():
        return "".join(_digest(p) for p in sorted(path.iterdir()))
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def inputs(tmp_path) -> dict[str, Path]:
    """Every kind of path `apply` reads, each a real file."""
    torch.manual_seed(0)
    sd = {"module.a.weight": torch.randn(4, 4), "module.b.bias": torch.randn(4)}
    (tmp_path / "src.safetensors").write_bytes(b"")
    save_file(sd, tmp_path / "src.safetensors")
    save_file(
        {k.removeprefix("module."): v for k, v in sd.items()}, tmp_path / "target.safetensors"
    )
    (tmp_path / "target.json").write_text(json.dumps({"a.weight": [4, 4], "b.bias": [4]}))
    (tmp_path / "common.ckmap").write_text('strip "module."\n')
    (tmp_path / "rules.ckmap").write_text('include "common.ckmap"\n')
    (tmp_path / "plan.json").write_text(
        _run("plan", tmp_path / "rules.ckmap", "-s", tmp_path / "src.safetensors", "--json")
    )
    save_file(
        {k.removeprefix("module."): v for k, v in sd.items()}, tmp_path / "mapped.safetensors"
    )
    return {
        "source": tmp_path / "src.safetensors",
        "rules": tmp_path / "rules.ckmap",
        "included rule file": tmp_path / "common.ckmap",
        "target checkpoint": tmp_path / "target.safetensors",
        "target json": tmp_path / "target.json",
        "saved plan": tmp_path / "plan.json",
        "mapped": tmp_path / "mapped.safetensors",
    }


# --- 1. inputs are never written -------------------------------------------------------------

READS = ["source", "rules", "included rule file", "target checkpoint", "target json", "saved plan"]


def _apply_args(inputs: dict[str, Path], read: str, out: Path, report: Path | None) -> list:
    """An apply that reads `read` (forward with a target, or reverse from a saved plan)."""
    tail = ["-o", out, *(["--report", report] if report is not None else []), "--overwrite"]
    if read == "saved plan":
        return ["apply", "--plan", inputs["saved plan"], "--reverse", "-s", inputs["mapped"], *tail]
    target = inputs["target json"] if read == "target json" else inputs["target checkpoint"]
    return ["apply", inputs["rules"], "-s", inputs["source"], "-t", target, *tail]


@pytest.mark.parametrize("how", ["same path", "symlink", "hard link"])
@pytest.mark.parametrize("write", ["--out", "--report"])
@pytest.mark.parametrize("read", READS)
def test_no_write_path_can_reach_a_read_path(inputs, tmp_path, read, write, how):
    victim = inputs[read]
    before = _digest(victim)
    alias = victim
    if how != "same path":
        alias = tmp_path / f"alias{victim.suffix if write == '--out' else '.json'}"
        if how == "symlink":
            alias.symlink_to(victim)
        else:
            os.link(victim, alias)
    if write == "--out":
        args = _apply_args(inputs, read, alias, None)
    else:
        args = _apply_args(inputs, read, tmp_path / "fresh.safetensors", alias)
    if write == "--out" and victim.suffix != ".safetensors":
        args[args.index(alias)] = alias  # a rule file or JSON as --out: refused by name first
    output = _run(*args, status=2)
    assert "CKM530" in output or "CKM531" in output, output
    assert _digest(victim) == before
    assert not (tmp_path / "fresh.safetensors").exists()


def test_report_and_out_may_not_be_one_file(inputs, tmp_path):
    out = tmp_path / "o.safetensors"
    output = _run("apply", inputs["rules"], "-s", inputs["source"], "-o", out, "--report", out,
                  status=2)  # fmt: skip
    assert "refusing to write over the --report" in output or "over the --out" in output


def test_reverse_may_not_write_over_the_original(inputs, tmp_path):
    original = inputs["source"]
    before = _digest(original)
    _run("apply", inputs["rules"], "--reverse", "--original", original, "-s", inputs["mapped"],
         "-o", original, "--overwrite", status=2)  # fmt: skip
    assert _digest(original) == before


@pytest.mark.parametrize("write", ["--out", "--report"])
def test_a_planted_symlink_at_the_temporary_name_is_never_followed(inputs, tmp_path, write):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    out, report = tmp_path / "out.safetensors", tmp_path / "report.json"
    target = out if write == "--out" else report
    # the names an earlier version used, and pid-prefixed variants
    for name in (f".{target.name}.ckptmap-partial-{os.getpid()}",):
        (tmp_path / name).symlink_to(victim)
    _run("apply", inputs["rules"], "-s", inputs["source"], "-o", out, "--report", report,
         status=0)  # fmt: skip
    assert victim.read_text() == "precious"
    assert not out.is_symlink() and set(load_file(out)) == {"a.weight", "b.bias"}
    assert not report.is_symlink() and json.loads(report.read_text())["loaded"]


def test_a_symlink_at_the_destination_is_replaced_not_followed(inputs, tmp_path):
    victim = tmp_path / "victim.safetensors"
    victim.write_bytes(b"precious")
    out = tmp_path / "out.safetensors"
    out.symlink_to(victim)
    _run("apply", inputs["rules"], "-s", inputs["source"], "-o", out, status=2)  # exists
    _run("apply", inputs["rules"], "-s", inputs["source"], "-o", out, "--overwrite", status=0)
    assert victim.read_bytes() == b"precious" and not out.is_symlink()


def test_outputs_get_ordinary_permissions(inputs, tmp_path):
    out = tmp_path / "out.safetensors"
    _run("apply", inputs["rules"], "-s", inputs["source"], "-o", out, status=0)
    mask = os.umask(0)
    os.umask(mask)
    assert out.stat().st_mode & 0o777 == 0o666 & ~mask
