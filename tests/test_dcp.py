"""torch.distributed.checkpoint folders as files, on one process (through DCP itself):
inspect, plan from the metadata, apply DCP -> safetensors and safetensors -> DCP, load."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from models import ResNet, wrapped
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

import ckptmap
from ckptmap.cli import app
from ckptmap.io import open_checkpoint

runner = CliRunner(env={"COLUMNS": "200"})


def save_dcp(sd: dict, folder: Path) -> Path:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # one process: DCP says it has no process group
        dcp.save(sd, checkpoint_id=str(folder))
    return folder


def test_a_dcp_folder_is_a_checkpoint(tmp_path):
    torch.manual_seed(0)
    sd = wrapped(ResNet(10))
    sd["module.step"] = torch.tensor(7)
    folder = save_dcp(sd, tmp_path / "step-100")
    ckpt = open_checkpoint(folder)
    assert {k: tuple(v.shape) for k, v in sd.items()} == {
        k: m.shape for k, m in ckpt.meta().items()
    }
    assert ckpt.meta()["module.step"].dtype == "int64"
    assert torch.equal(ckpt.get("module.fc.weight"), sd["module.fc.weight"])
    result = runner.invoke(app, ["inspect", str(folder)])
    assert result.exit_code == 0, result.output
    assert "module.fc.weight" in result.output and f"{len(sd)} tensors" in result.output
    # plan from the metadata alone, then apply DCP -> safetensors
    (tmp_path / "r.ckmap").write_text('strip "module."\nskip "step"\n')
    result = runner.invoke(app, ["plan", str(tmp_path / "r.ckmap"), "-s", str(folder)])
    assert result.exit_code == 0, result.output
    out = tmp_path / "resnet.safetensors"
    result = runner.invoke(
        app, ["apply", str(tmp_path / "r.ckmap"), "-s", str(folder), "-o", str(out)]
    )
    assert result.exit_code == 0, result.output
    got = load_file(out)
    assert got.keys() == {k.removeprefix("module.") for k in sd if k != "module.step"}
    assert all(torch.equal(got[k], sd[f"module.{k}"]) for k in got)
    # load_into straight from the folder
    model = ResNet(10)
    ckptmap.load_into(model, folder, 'strip "module."\nskip "step"')
    assert torch.equal(model.fc.weight, sd["module.fc.weight"])


def test_safetensors_to_dcp_and_back(tmp_path):
    torch.manual_seed(0)
    sd = ResNet(10).state_dict()
    save_file(sd, tmp_path / "r.safetensors")
    (tmp_path / "rename.ckmap").write_text('rename "fc" -> "head"\n')
    out = tmp_path / "renamed.dcp"
    result = runner.invoke(
        app,
        [
            "apply",
            str(tmp_path / "rename.ckmap"),
            "-s",
            str(tmp_path / "r.safetensors"),
            "-o",
            str(out),
        ],
    )
    assert result.exit_code == 0, result.output
    assert (out / ".metadata").is_file() and not list(tmp_path.glob(".renamed.dcp*"))
    back = open_checkpoint(out)
    assert torch.equal(back.get("head.weight"), sd["fc.weight"])
    assert "fc.weight" not in back.meta()
    # an existing output is replaced only with --overwrite, and only a DCP folder
    args = [
        "apply",
        str(tmp_path / "rename.ckmap"),
        "-s",
        str(tmp_path / "r.safetensors"),
        "-o",
        str(out),
    ]
    assert runner.invoke(app, args).exit_code == 2
    assert runner.invoke(app, [*args, "--overwrite"]).exit_code == 0
    (out / "notes.txt").write_text("mine")
    result = runner.invoke(app, [*args, "--overwrite"])
    assert result.exit_code == 2 and "more than a sharded checkpoint" in result.output
    assert (out / "notes.txt").read_text() == "mine"


def test_a_broken_dcp_folder_is_one_line(tmp_path):
    folder = tmp_path / "bad"
    folder.mkdir()
    (folder / ".metadata").write_bytes(b"not a pickle")
    result = runner.invoke(app, ["inspect", str(folder)])
    assert result.exit_code == 2 and "CKM526" in result.output and "Traceback" not in result.output
    with pytest.raises(ckptmap.CheckpointError):
        open_checkpoint(folder)
