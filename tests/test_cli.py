"""The command line, in process (typer's runner) and, for exit codes, as a real process."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from models import ResNet, wrapped
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

import ckptmap
from ckptmap.cli import app
from ckptmap.shipped import shipped_file

runner = CliRunner(env={"COLUMNS": "200"})


@pytest.fixture
def target_json(tmp_path) -> Path:
    shapes = {k: list(v.shape) for k, v in ResNet(5).state_dict().items()}
    path = tmp_path / "target.json"
    path.write_text(json.dumps(shapes))
    return path


def test_check_ok_and_error(tmp_path):
    good = tmp_path / "good.ckmap"
    good.write_text('strip "module."\n')
    result = runner.invoke(app, ["check", str(good)])
    assert result.exit_code == 0 and "ok, 1 rules" in result.output
    bad = tmp_path / "bad.ckmap"
    bad.write_text('strip "module."\nrename "a" "b"\n')
    result = runner.invoke(app, ["check", str(bad)])
    assert result.exit_code == 2
    assert "bad.ckmap:2:12: error[CKM102]" in result.output
    assert "Traceback" not in result.output


def test_fmt_rewrites_and_check_mode(tmp_path):
    f = tmp_path / "r.ckmap"
    f.write_text('# wrappers\nstrip   "module."   # ddp\nrename "a"->"b"\n')
    result = runner.invoke(app, ["fmt", "--check", str(f)])
    assert result.exit_code == 1 and "would reformat" in result.output
    assert f.read_text().startswith("# wrappers\nstrip")  # --check changes nothing
    assert runner.invoke(app, ["fmt", str(f)]).exit_code == 0
    assert f.read_text() == (
        '# wrappers\n\nckptmap 1\n\nstrip "module."  # ddp\nrename "a" -> "b"\n'
    )
    assert runner.invoke(app, ["fmt", "--check", str(f)]).exit_code == 0


def test_plan_clean_and_with_problems(ddp_checkpoint, target_json):
    rules = shipped_file("rules", "resnet-new-head.ckmap")
    args = ["plan", str(rules), "--source", str(ddp_checkpoint), "--target", str(target_json)]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "120 loaded, 2 skipped" in result.output
    assert "unused rule" not in result.output

    ddp = shipped_file("rules", "ddp.ckmap")
    result = runner.invoke(
        app, ["plan", str(ddp), "--source", str(ddp_checkpoint), "--target", str(target_json)]
    )
    assert result.exit_code == 1
    assert (
        "shape mismatch: module.fc.weight [1000, 64] -> fc.weight expects [5, 64]" in result.output
    )

    result = runner.invoke(app, [*args, "--json"])
    plan = json.loads(result.output)
    assert plan["fingerprint"].startswith("sha256:") and len(plan["sources"]) == 122


def test_plan_several_rule_files_in_order(ddp_checkpoint, tmp_path, target_json):
    head = tmp_path / "head.ckmap"
    head.write_text('init "fc"\n')
    ddp = shipped_file("rules", "ddp.ckmap")
    args = ["plan", str(ddp), str(head), "-s", str(ddp_checkpoint), "-t", str(target_json)]
    assert runner.invoke(app, args).exit_code == 0


def test_apply_writes_mapped_checkpoint(ddp_checkpoint, tmp_path, target_json):
    out = tmp_path / "out.safetensors"
    rules = shipped_file("rules", "resnet-new-head.ckmap")
    report = tmp_path / "report.json"
    result = runner.invoke(
        app,
        [
            "apply",
            str(rules),
            "-s",
            str(ddp_checkpoint),
            "-o",
            str(out),
            "-t",
            str(target_json),
            "--report",
            str(report),
        ],
    )
    assert result.exit_code == 0, result.output
    mapped = load_file(out)
    source = load_file(ddp_checkpoint)
    assert "fc.weight" not in mapped and len(mapped) == 120
    assert torch.equal(mapped["conv1.weight"], source["module.conv1.weight"])
    assert json.loads(report.read_text())["plan_fingerprint"].startswith("sha256:")
    from safetensors import safe_open

    with safe_open(out, "pt") as f:
        meta = f.metadata()
    assert meta["ckptmap.rules_fingerprint"].startswith("sha256:")
    assert json.loads(meta["ckptmap.source"]) == [
        {"name": "ddp.safetensors", "bytes": ddp_checkpoint.stat().st_size}
    ]


def test_apply_refuses_to_overwrite_the_source(ddp_checkpoint):
    before = ddp_checkpoint.read_bytes()
    ddp = shipped_file("rules", "ddp.ckmap")
    result = runner.invoke(
        app, ["apply", str(ddp), "-s", str(ddp_checkpoint), "-o", str(ddp_checkpoint)]
    )
    assert result.exit_code == 2 and "refusing to write over the source" in result.output
    assert ddp_checkpoint.read_bytes() == before


def test_apply_with_plan_problems_writes_nothing(ddp_checkpoint, tmp_path, target_json):
    out = tmp_path / "out.safetensors"
    ddp = shipped_file("rules", "ddp.ckmap")
    result = runner.invoke(
        app, ["apply", str(ddp), "-s", str(ddp_checkpoint), "-o", str(out), "-t", str(target_json)]
    )
    assert result.exit_code == 1
    assert not out.exists() and not list(tmp_path.glob(".out*"))


def test_inspect_collapses_layers(ddp_checkpoint):
    result = runner.invoke(app, ["inspect", str(ddp_checkpoint)])
    assert result.exit_code == 0
    assert "module.layer{1..4}.{0,1}.bn{1,2}.num_batches_tracked" in result.output
    assert "122 tensors" in result.output


def test_inspect_missing_file(tmp_path):
    result = runner.invoke(app, ["inspect", str(tmp_path / "nope.safetensors")])
    assert result.exit_code == 2 and "no such file" in result.output


def test_schema_is_json_schema():
    result = runner.invoke(app, ["schema"])
    schema = json.loads(result.output)
    assert schema["title"] == "ckptmap rules"
    assert (
        len(schema["properties"]["rules"]["items"]["anyOf"]) == 16
    )  # every statement form, revision included


@pytest.mark.slow
def test_demo_runs_as_a_real_process():
    result = subprocess.run(
        [sys.executable, "-m", "ckptmap.cli", "demo"], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr
    assert "trainable parameters: ['fc.weight', 'fc.bias']" in result.stdout


def test_exit_status_of_a_real_process(tmp_path):
    bad = tmp_path / "bad.ckmap"
    bad.write_text("renam 'x'\n")
    result = subprocess.run(
        [sys.executable, "-m", "ckptmap", "check", str(bad)], capture_output=True, text=True
    )
    assert result.returncode == 2
    assert "error[CKM104]: unknown statement 'renam'" in result.stderr
    assert "Traceback" not in result.stderr


def test_inspect_golden(tmp_path, golden):

    path = tmp_path / "resnet.safetensors"
    save_file(wrapped(ResNet(1000)), path)
    result = runner.invoke(app, ["inspect", str(path)])
    assert result.exit_code == 0
    golden("cli_inspect.txt", result.output)


def test_plan_golden(tmp_path, ddp_checkpoint, target_json, golden):

    rules = tmp_path / "finetune.ckmap"
    rules.write_text(
        'strip "module."\noptional strip "_orig_mod."\ninit "fc"\nfreeze "**"\nunfreeze "fc"\n'
    )
    args = ["plan", str(rules), "-s", str(ddp_checkpoint), "-t", str(target_json)]
    result = runner.invoke(app, args)
    assert result.exit_code == 0
    golden("cli_plan.txt", result.output.replace(str(tmp_path), "<tmp>"))


def test_debug_shows_the_traceback(tmp_path):
    bad = tmp_path / "bad.ckmap"
    bad.write_text('rename "a" "b"\n')
    result = runner.invoke(app, ["--debug", "check", str(bad)])
    assert isinstance(result.exception, ckptmap.RuleSyntaxError)


def test_the_command_returns_freed_tensors_to_the_system(monkeypatch):
    """The CLI process fixes glibc's mmap threshold (no drift with release order), unless
    the environment already says what it wants."""
    import ctypes

    import ckptmap.cli as cli

    calls = []

    class Libc:
        def mallopt(self, option, value):
            calls.append((option, value))
            return 1

    monkeypatch.setattr(ctypes, "CDLL", lambda name: Libc())
    monkeypatch.setattr(sys, "platform", "linux")
    monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_", raising=False)
    cli._give_back_freed_tensors()
    assert calls == [(-3, 4 << 20)]  # M_MMAP_THRESHOLD
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "65536")
    cli._give_back_freed_tensors()
    assert len(calls) == 1
