"""torch.distributed.checkpoint folders as files, on one process (through DCP itself):
inspect, plan from the metadata, apply DCP -> safetensors and safetensors -> DCP, load."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from models import ResNet, wrapped
from ranks import gloo, spawn
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
    args = ["apply", str(tmp_path / "rename.ckmap"), "-s", str(tmp_path / "r.safetensors")]
    args += ["-o", str(out)]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert (out / ".metadata").is_file() and not list(tmp_path.glob(".renamed.dcp*"))
    back = open_checkpoint(out)
    assert torch.equal(back.get("head.weight"), sd["fc.weight"])
    assert "fc.weight" not in back.meta()
    # an existing output is replaced only with --overwrite, and only a DCP folder
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


def test_the_load_planner_renames_in_dcp_load(tmp_path):
    from torch.distributed.checkpoint.api import CheckpointException

    import ckptmap.dcp as ckptmap_dcp
    from ckptmap.dcp import LoadPlanner

    torch.manual_seed(0)
    old = ResNet(10)
    folder = save_dcp(wrapped(old), tmp_path / "ckpt")
    reader = dcp.FileSystemReader(str(folder))
    model = ResNet(10)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        planner = LoadPlanner('strip "module."')
        dcp.load(model.state_dict(), storage_reader=reader, planner=planner)
    pairs = zip(model.state_dict().values(), old.state_dict().values(), strict=True)
    assert all(torch.equal(a, b) for a, b in pairs)
    assert planner.plan.ok and len(planner.plan.sources) == len(old.state_dict())
    # a plan problem is raised before anything is read, the model untouched
    fresh = ResNet(10)
    before = {k: v.clone() for k, v in fresh.state_dict().items()}
    with pytest.raises(CheckpointException) as e, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # inside dcp.load, DCP wraps the error: ours is in it
        dcp.load(fresh.state_dict(), storage_reader=reader, planner=LoadPlanner(""))
    assert "error[CKM304]" in str(e.value)
    with pytest.raises(ckptmap.PlanError):  # the front door validates first: ckptmap's error
        ckptmap_dcp.load(fresh.state_dict(), folder, "")
    assert all(torch.equal(before[k], v) for k, v in fresh.state_dict().items())
    plan = ckptmap_dcp.load(fresh.state_dict(), folder, 'strip "module."')
    assert plan.ok and torch.equal(fresh.fc.weight, old.fc.weight)


def _sharded_worker(rank: int, world: int, port: int, folder: str, out: str) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    import ckptmap.dcp as ckptmap_dcp

    with gloo(rank, world, port):
        mesh = init_device_mesh("cpu", (world,))
        g = torch.Generator().manual_seed(0)
        full_w, full_v = torch.randn(5, 4, generator=g), torch.randn(3, 7, generator=g)  # uneven
        saved = {
            "module.w": distribute_tensor(full_w, mesh, [Shard(0)]),
            "module.v": distribute_tensor(full_v, mesh, [Shard(1)]),
        }
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            dcp.save(saved, checkpoint_id=folder)
        target = {
            "w": distribute_tensor(torch.zeros(5, 4), mesh, [Shard(0)]),
            "v": distribute_tensor(torch.zeros(3, 7), mesh, [Shard(1)]),
        }
        ckptmap_dcp.load(target, folder, 'strip "module."')
        same = torch.equal(target["w"].full_tensor(), full_w) and torch.equal(
            target["v"].full_tensor(), full_v
        )
        try:  # a bad rule fails every rank alike, before any read
            ckptmap_dcp.load(target, folder, 'rename "nothing" -> "x"')
            failed = "none"
        except ckptmap.CkptmapError as e:
            failed = e.code
        model = torch.nn.Module()  # load_into cuts each rank's box from whole tensors too
        model.register_parameter("w", torch.nn.Parameter(torch.zeros_like(target["w"])))
        ckptmap.load_into(model, {"w": full_w}, "")
        sharded = "loaded" if torch.equal(model.w.full_tensor(), full_w) else "wrong"
        Path(out, f"rank{rank}").write_text(f"{same} {failed} {sharded}")


@pytest.mark.slow
@pytest.mark.parametrize("world", [2, 3])
def test_the_load_planner_on_sharded_dtensors(tmp_path, world):
    spawn(_sharded_worker, world, str(tmp_path / "ckpt"), str(tmp_path))
    results = [(tmp_path / f"rank{r}").read_text() for r in range(world)]
    assert results == ["True CKM304 loaded"] * world, results


def test_the_state_dict_adapter_pair():
    from models import HFLlama, MyLlama

    from ckptmap.dcp import StateDictAdapter

    rules = Path(__file__).resolve().parents[1] / "rules" / "hf-llama-to-blocks.ckmap"
    torch.manual_seed(0)
    hf = HFLlama().state_dict()
    adapter = StateDictAdapter(rules)
    mine = adapter.from_hf(hf)
    assert mine.keys() == MyLlama().state_dict().keys()
    assert mine["blocks.0.attn.q.weight"] is hf["model.layers.0.self_attn.q_proj.weight"]
    back = adapter.to_hf(mine)
    assert back.keys() == hf.keys() and all(torch.equal(back[k], v) for k, v in hf.items())
    # to_hf first needs the Hugging Face names: from a checkpoint, or {name: shape}
    fresh = StateDictAdapter(rules, hf_keys={k: list(v.shape) for k, v in hf.items()})
    assert fresh.to_hf(mine).keys() == hf.keys()
    with pytest.raises(ckptmap.UsageError, match="call from_hf first"):
        StateDictAdapter(rules).to_hf(mine)


def test_the_load_planner_computes_transforms_from_boxes(tmp_path):
    """One process: a fuse, a transpose and RoPE through DCP's FileSystemReader and
    HuggingFaceStorageReader equal `load_into`; a Plan for another checkpoint is refused."""
    from test_dcp_sharded import RULES, Model, source_tensors

    from ckptmap.dcp import LoadPlanner, reader

    src = source_tensors()
    save_file(src, tmp_path / "src.safetensors")
    folder = save_dcp(src, tmp_path / "src.dcp")
    expected = Model()
    ckptmap.load_into(expected, src, RULES)
    for storage in (
        dcp.FileSystemReader(str(folder)),
        dcp.HuggingFaceStorageReader(str(tmp_path)),
        reader(tmp_path / "src.safetensors"),
    ):
        model = Model()
        planner = LoadPlanner(RULES)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            dcp.load(model.state_dict(), storage_reader=storage, planner=planner)
        got = model.state_dict()
        assert all(torch.equal(got[k], v) for k, v in expected.state_dict().items())
        assert planner.bytes_read == sum(t.numel() * 4 for t in src.values())
    # a plan made for another checkpoint is refused before anything is read
    other = ckptmap.compile(RULES).plan({**src, "emb.weight": torch.zeros(9, 5)})
    with pytest.raises(ckptmap.LoadError) as e:
        LoadPlanner(other).prepare(
            Model().state_dict(), dcp.FileSystemReader(str(folder)).read_metadata()
        )
    assert e.value.code == "CKM411" and "emb.weight" in e.value.message


def test_a_sharded_load_refuses_what_it_cannot_read_in_pieces(tmp_path):
    from ckptmap.dcp import reader

    torch.save({"w": torch.zeros(2)}, tmp_path / "x.pt")
    with pytest.raises(ckptmap.LoadError) as e:
        reader(tmp_path / "x.pt")
    assert e.value.code == "CKM409" and "ckptmap apply" in e.value.hint


def test_save_writes_back_under_the_original_names(tmp_path):
    """One process (no process group): the inverted plan, through DCP's writer, to one
    safetensors file, a Hugging Face folder, or a DCP folder; an existing output is kept."""
    from test_dcp_sharded import RULES, Model, source_tensors

    from ckptmap.dcp import save

    src = source_tensors()
    save_file(src, tmp_path / "src.safetensors")
    model = Model()
    ckptmap.load_into(model, tmp_path / "src.safetensors", RULES)
    for out, size in (("back.safetensors", None), ("back-hf", 600), ("back.dcp", None)):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            save(
                model.state_dict(),
                tmp_path / out,
                RULES,
                tmp_path / "src.safetensors",
                max_shard_size=size,
            )
        back = open_checkpoint(tmp_path / out)
        assert back.meta().keys() == src.keys(), out
        assert all(torch.equal(back.get(k), v) for k, v in src.items()), out
    assert len(list((tmp_path / "back-hf").glob("*.safetensors"))) > 1
    assert not list(tmp_path.glob(".back*"))
    mode = (tmp_path / "back.dcp").stat().st_mode & 0o777
    assert mode == (tmp_path / "back-hf").stat().st_mode & 0o777  # an output's, not 0700
    with pytest.raises(ckptmap.UsageError, match="above 0"):
        save(model, tmp_path / "x-hf", RULES, tmp_path / "src.safetensors", max_shard_size=0)
    with pytest.raises(ckptmap.CheckpointError) as e:
        save(model.state_dict(), tmp_path / "back.safetensors", RULES, tmp_path / "src.safetensors")
    assert e.value.code == "CKM533"
