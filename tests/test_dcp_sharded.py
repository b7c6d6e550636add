"""Sharded loads on 2 and 3 gloo processes: DTensor models (Shard(0), Shard(1) with uneven and
empty shards, Replicate) and an FSDP2 model, loaded through `ckptmap.load_into` from a
safetensors file, a Hugging Face folder and a DCP folder, and through `LoadPlanner` inside
`dcp.load`, with a q/k/v fuse, a transpose and RoPE permutations across the shards. Every
rank's result is bit-identical to the single-process `load_into`; each rank reads only its
boxes (RoPE across its rows reads the whole source); a problem on one rank fails every rank
with the same error and leaves the parameters as they were; `ckptmap.dcp.save` writes the
model back under the original names."""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import pytest
import torch
from ranks import gloo, spawn
from safetensors.torch import load_file, save_file
from torch import nn

import ckptmap

RULES = """\
rename "layers" -> "blocks"
merge "blocks.{i}.q.weight", "blocks.{i}.k.weight", "blocks.{i}.v.weight" -> "blocks.{i}.qkv.weight" | cat(0)
transform "blocks.*.proj.weight" | transpose(0, 1)
transform "blocks.*.rope*.weight" | rope_permute(2)
"""
LAYERS = 2


def source_tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    sd = {"emb.weight": torch.randn(9, 4, generator=g), "norm.weight": torch.randn(4, generator=g)}
    for i in range(LAYERS):
        p = f"layers.{i}"
        sd[f"{p}.q.weight"] = torch.randn(6, 4, generator=g)
        sd[f"{p}.k.weight"] = torch.randn(2, 4, generator=g)
        sd[f"{p}.v.weight"] = torch.randn(2, 4, generator=g)
        sd[f"{p}.proj.weight"] = torch.randn(4, 7, generator=g)
        sd[f"{p}.rope0.weight"] = torch.randn(8, 5, generator=g)
        sd[f"{p}.rope1.weight"] = torch.randn(8, 6, generator=g)
    return sd


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.qkv = nn.Linear(4, 10, bias=False)
        self.proj = nn.Linear(4, 7, bias=False)
        self.rope0 = nn.Linear(5, 8, bias=False)
        self.rope1 = nn.Linear(6, 8, bias=False)


class Model(nn.Module):
    def __init__(self, wide: int = 4):
        super().__init__()
        self.emb = nn.Embedding(9, 4)
        self.blocks = nn.ModuleList(Block() for _ in range(LAYERS))
        self.norm = nn.LayerNorm(wide, bias=False)


# how each parameter is laid out across ranks: rows, columns (4 columns over 3 ranks: 2, 2, 0)
PLACEMENT = {"qkv": 0, "proj": 1, "rope0": 0, "rope1": 1, "emb": 0, "norm": None}


def sharded(model: nn.Module, mesh) -> nn.Module:
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    for name, param in list(model.named_parameters()):
        module_name, _, leaf = name.rpartition(".")
        module = model.get_submodule(module_name)
        dim = PLACEMENT[module_name.rsplit(".", 1)[-1]]
        placement = Replicate() if dim is None else Shard(dim)
        dt = distribute_tensor(param.detach(), mesh, [placement])
        module.register_parameter(leaf, nn.Parameter(dt))
    return model


def boxes_bytes(model: nn.Module) -> tuple[int, int]:
    """What this rank should read: its boxes of every loaded parameter, and the whole
    sources of the RoPE permutations that cut through rows (rope0: Shard(0))."""
    boxes = whole = 0
    for name, p in model.state_dict().items():
        local = p.to_local()
        if "rope0" in name and local.numel():
            whole += p.numel() * 4
        else:
            boxes += local.numel() * 4
    return boxes + whole, whole


def _code(call) -> str:
    try:
        call()
        return "ok"
    except ckptmap.CkptmapError as e:
        return e.code


def refusals(rank: int, world: int, mesh, root: Path, src: dict) -> list[str]:
    """What a sharded load says no to, alike on every rank, before anything is read:
    a model on the meta device, a source of DTensors, a file one rank cannot find."""
    from torch.distributed.tensor import Shard, distribute_tensor

    with torch.device("meta"):
        on_meta = Model()
    from torch.distributed.fsdp import fully_shard

    fully_shard(on_meta, mesh=mesh)
    dtensors = {k: distribute_tensor(v, mesh, [Shard(0)]) for k, v in src.items()}
    here = root / ("src.safetensors" if rank != world - 1 else "elsewhere.safetensors")
    return [
        _code(lambda: ckptmap.load_into(on_meta, root / "src.safetensors", RULES)),
        _code(lambda: ckptmap.load_into(sharded(Model(), mesh), dtensors, RULES)),
        _code(lambda: ckptmap.load_into(sharded(Model(), mesh), here, RULES)),
    ]


def with_a_load_hook(mesh, src: dict) -> bool:
    """A module with a load pre-hook (it scales what it is given) loads as on one process:
    the model's own load code runs."""

    def hooked(model: nn.Module) -> nn.Module:
        def scale(module, state_dict, prefix, *args):
            key = prefix + "weight"
            if key in state_dict:
                state_dict[key] = state_dict[key] * 2

        model.emb.register_load_state_dict_pre_hook(scale)
        return model

    one = hooked(Model())
    ckptmap.load_into(one, src, RULES)
    many = hooked(sharded(Model(), mesh))
    ckptmap.load_into(many, src, RULES)
    return all(
        torch.equal(v.full_tensor(), one.state_dict()[k]) for k, v in many.state_dict().items()
    )


def hooks_on_one_rank(rank: int, world: int, mesh, src: dict) -> list[str]:
    """Load code on the last rank only: a harmless hook (no hang, loaded), one that writes
    a buffer the plan does not load and then raises (the same error everywhere, nothing
    changed on any rank), one that says a key is missing (refused everywhere)."""
    last = rank == world - 1

    def harmless(module, keys):
        return None

    def writes_then_raises(module, keys):
        module.weight.to_local().fill_(7)  # what it writes must be put back too
        raise ValueError("boom")

    def says_missing(module, keys):
        keys.missing_keys.append("emb.scale")

    out = []
    for hook in (harmless, writes_then_raises, says_missing):
        model = sharded(Model(), mesh)
        before = {k: v.to_local().clone() for k, v in model.state_dict().items()}
        if last:
            model.norm.register_load_state_dict_post_hook(hook)
        code = _code(lambda m=model: ckptmap.load_into(m, src, RULES))
        after = model.state_dict()
        same = all(torch.equal(before[k], v.to_local()) for k, v in after.items())
        out.append(f"{code} {'untouched' if same else 'loaded'}")
    return out


def _worker(rank: int, world: int, port: int, tmp: str) -> None:
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import Shard, distribute_tensor

    from ckptmap.dcp import LoadPlanner, save

    warnings.simplefilter("ignore")  # DCP's notes on one-file checkpoints and CPU gloo
    results: dict[str, object] = {}
    with gloo(rank, world, port):
        mesh = init_device_mesh("cpu", (world,))
        root = Path(tmp)
        src = source_tensors()
        if rank == 0:  # the same checkpoint as a file, a Hugging Face folder and a DCP folder
            save_file(src, root / "src.safetensors")
            hf = root / "hf"
            hf.mkdir()
            names = sorted(src)
            half = {
                n: (
                    "model-00001-of-00002.safetensors"
                    if i % 2
                    else "model-00002-of-00002.safetensors"
                )
                for i, n in enumerate(names)
            }
            for file in set(half.values()):
                save_file({n: src[n] for n in names if half[n] == file}, hf / file)
            (hf / "model.safetensors.index.json").write_text(
                json.dumps({"metadata": {}, "weight_map": half})
            )
        dcp.save(
            {k: distribute_tensor(v, mesh, [Shard(0)]) for k, v in src.items()},
            checkpoint_id=str(root / "src.dcp"),
        )
        dist.barrier()

        expected = Model()  # the single-process load, on every rank
        ckptmap.load_into(expected, src, RULES)
        want = expected.state_dict()

        def same(model: nn.Module) -> bool:
            got = {k: v.full_tensor() for k, v in model.state_dict().items()}
            return got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)

        for kind, source in (
            ("file", root / "src.safetensors"),
            ("hf", root / "hf"),
            ("dcp", root / "src.dcp"),
            ("dict", src),
        ):
            model = sharded(Model(), mesh)
            report = ckptmap.load_into(model, source, RULES)
            results[f"load_into {kind}"] = same(model) and len(report.loaded) == len(want)

        fsdp = Model()
        fully_shard(fsdp, mesh=mesh)
        ckptmap.load_into(fsdp, root / "src.safetensors", RULES)
        results["fsdp2"] = same(fsdp)

        # LoadPlanner in dcp.load, with DCP's two readers; bytes asked for on this rank
        for kind, storage in (
            ("FileSystemReader", dcp.FileSystemReader(str(root / "src.dcp"))),
            ("HuggingFaceStorageReader", dcp.HuggingFaceStorageReader(str(root / "hf"))),
        ):
            model = sharded(Model(), mesh)
            planner = LoadPlanner(RULES)
            dcp.load(model.state_dict(), storage_reader=storage, planner=planner)
            results[kind] = same(model)
            results[f"{kind} bytes"] = (planner.bytes_read, planner.bytes_whole)
        results["expected bytes"] = boxes_bytes(model)
        results["total bytes"] = sum(t.numel() * 4 for t in src.values())

        # a bad rule, and a shape that differs on one rank only: the same error everywhere
        model = sharded(Model(), mesh)
        before = {k: v.to_local().clone() for k, v in model.state_dict().items()}
        other = sharded(Model(wide=5), mesh)  # distributing is collective: every rank makes it
        errors = []
        for rules, target in (
            (RULES + 'rename "nothing" -> "x"\n', model),
            (RULES, model if rank != world - 1 else other),
        ):
            try:
                ckptmap.load_into(target, root / "src.safetensors", rules)
                errors.append("loaded")
            except ckptmap.CkptmapError as e:
                errors.append(f"{e.code} {e.message} {e.details[-1]}")
        # a file cut short while it is read: every rank fails alike, nothing is copied in
        if rank == 0:
            shutil.copytree(root / "src.dcp", root / "cut.dcp")
            piece = sorted((root / "cut.dcp").glob("*.distcp"))[-1]
            piece.write_bytes(piece.read_bytes()[:100])
        dist.barrier()
        try:
            ckptmap.load_into(model, root / "cut.dcp", RULES)
            errors.append("loaded")
        except ckptmap.CkptmapError as e:
            errors.append(e.code)
        results["errors"] = errors
        results["untouched"] = all(
            torch.equal(before[k], v.to_local()) for k, v in model.state_dict().items()
        )
        results["refused"] = refusals(rank, world, mesh, root, src)
        results["hooks"] = with_a_load_hook(mesh, src)
        results["hooks on one rank"] = hooks_on_one_rank(rank, world, mesh, src)

        # back under the original names: each rank writes its pieces, rank 0 one file
        loaded = sharded(Model(), mesh)
        ckptmap.load_into(loaded, root / "src.dcp", RULES)
        save(loaded, root / "back.safetensors", RULES, root / "src.safetensors")
        if rank == 0:
            back = load_file(root / "back.safetensors")
            results["saved back"] = back.keys() == src.keys() and all(
                torch.equal(back[k], v) for k, v in src.items()
            )
            results["no partial folders"] = not list(root.glob(".back*"))
        Path(tmp, f"rank{rank}.json").write_text(json.dumps(results))


@pytest.mark.slow
@pytest.mark.parametrize("world", [2, 3])
def test_sharded_loads_match_the_single_process_load(tmp_path, world):
    spawn(_worker, world, str(tmp_path))
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(world)]
    for rank, r in enumerate(ranks):
        for key in (
            "load_into file",
            "load_into hf",
            "load_into dcp",
            "load_into dict",
            "fsdp2",
            "FileSystemReader",
            "HuggingFaceStorageReader",
            "untouched",
        ):
            assert r[key] is True, (rank, key, r)
        # each rank asks for its boxes, plus the whole sources RoPE needs whole, no more
        expected, whole = r["expected bytes"]
        for reader in ("FileSystemReader", "HuggingFaceStorageReader"):
            assert r[f"{reader} bytes"] == [expected, whole], (rank, reader, r)
        assert expected < r["total bytes"]
    assert ranks[0]["saved back"] is True and ranks[0]["no partial folders"] is True
    assert all(r["refused"] == ["CKM408", "CKM409", "CKM501"] for r in ranks), ranks
    assert all(r["hooks"] is True for r in ranks)
    expected = ["ok loaded", "CKM405 untouched", "CKM404 untouched"]
    assert all(r["hooks on one rank"] == expected for r in ranks), ranks
    # the same error, naming the rank it came from, on every rank
    assert len({json.dumps(r["errors"]) for r in ranks}) == 1, [r["errors"] for r in ranks]
    bad_rule, one_rank, cut_short = ranks[0]["errors"]
    assert cut_short == "CKM410"
    assert bad_rule.startswith("CKM310") and "rank 0 of" in bad_rule
    assert one_rank.startswith("CKM3") and f"rank {world - 1} of {world}" in one_rank
