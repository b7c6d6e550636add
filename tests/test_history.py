"""Revision histories: the graph, schemas, identification, upgrade and downgrade composed
into one plan, stamps, completeness, loading, and the command line end to end."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from models import ResNet, StagedResNet
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

import ckptmap
from ckptmap.chain import tensor_seed
from ckptmap.cli import app
from ckptmap.history import History, schema_text
from ckptmap.meta import TensorMeta

runner = CliRunner(env={"COLUMNS": "200"})


def meta_of(sd: dict[str, torch.Tensor]) -> dict[str, TensorMeta]:
    return {
        k: TensorMeta(tuple(v.shape), str(v.dtype).removeprefix("torch.")) for k, v in sd.items()
    }


def write_history(folder: Path, steps: list[tuple], schemas: dict[str, dict]) -> Path:
    """steps: (id, parents, rule lines); schemas: {id: {name: TensorMeta}} snapshots."""
    folder.mkdir(parents=True, exist_ok=True)
    for rev, parents, body in steps:
        head = f'revision "{rev}"' + (
            " from " + ", ".join(f'"{p}"' for p in parents) if parents else ""
        )
        (folder / f"{rev}.ckmap").write_text(f"ckptmap 1\n{head}\n{body}")
    for rev, meta in schemas.items():
        (folder / f"{rev}.schema.json").write_text(schema_text(rev, meta))
    return folder


def v1_state(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    sd = {f"layers.{i}.{p}": torch.randn(4, 4, generator=g) for i in range(2) for p in "qkv"}
    sd["head.weight"] = torch.randn(10, 4, generator=g)
    sd["head.bias"] = torch.randn(10, generator=g)
    return sd


def four_steps(folder: Path) -> History:
    """The docs' history in small: a rename, an added layer, a head that grows, a fuse."""
    v1 = meta_of(v1_state())
    v3 = {k.replace("layers", "blocks"): m for k, m in v1.items()}
    v3 |= {f"blocks.2.{p}": TensorMeta((4, 4), "float32") for p in "qkv"}
    write_history(
        folder,
        [
            ("0001-base", (), ""),
            ("0002-rename", ("0001-base",), 'rename "layers" -> "blocks"\n'),
            ("0003-add-layer", ("0002-rename",), 'init "blocks.2" | normal(0, 0.02, 7)\n'),
            (
                "0004-grow-head",
                ("0003-add-layer",),
                'transform "head.weight" | pad(0, 0, 2)\ntransform "head.bias" | pad(0, 0, 2)\n',
            ),
            (
                "0005-fuse-qkv",
                ("0004-grow-head",),
                'merge "blocks.{i}.q", "blocks.{i}.k", "blocks.{i}.v" -> "blocks.{i}.qkv" | cat(0)\n',
            ),
        ],
        {"0001-base": v1, "0003-add-layer": v3},
    )
    return History(folder)


# --- the graph ----------------------------------------------------------------------------------


def test_graph_base_head_and_paths(tmp_path):
    h = four_steps(tmp_path / "m")
    assert h.base == "0001-base" and h.head == "0005-fuse-qkv" and h.heads == [h.head]
    assert h.order == sorted(h.steps)
    assert h.path_between("0002-rename", "head") == [
        "0003-add-layer",
        "0004-grow-head",
        "0005-fuse-qkv",
    ]
    assert h.parents("0003-add-layer") == ("0002-rename",)
    with pytest.raises(ckptmap.HistoryError) as e:
        h.path_between("0004-grow-head", "0002-rename")
    assert e.value.code == "CKM607" and "downgrade" in e.value.render()
    with pytest.raises(ckptmap.HistoryError, match="did you mean '0002-rename'"):
        h.resolve("0002-renam")
    summaries = {s.revision: str(s) for s in h.check()}
    assert summaries == {
        "0001-base": "0001-base (base, 8 tensors)",
        "0002-rename": "0002-rename <- 0001-base: 6 renamed",
        "0003-add-layer": "0003-add-layer <- 0002-rename: 3 added",
        "0004-grow-head": "0004-grow-head <- 0003-add-layer: 2 transformed",
        "0005-fuse-qkv": "0005-fuse-qkv <- 0004-grow-head: 3 transformed",
    }


@pytest.mark.parametrize(
    ("steps", "code", "said"),
    [
        ([("a", (), ""), ("b", ("a",), ""), ("b2", ("a",), "")], "CKM602", "2 heads (b, b2)"),
        ([("a", (), ""), ("b", ("nope",), "")], "CKM602", "comes from 'nope'"),
        ([("a", (), ""), ("b", (), "")], "CKM602", "has 2: a, b"),
        ([("a", ("b",), ""), ("b", ("a",), "")], "CKM602", "a cycle"),
        (
            [("a", (), ""), ("b", ("a",), ""), ("c", ("b", "x"), ""), ("x", ("c",), "")],
            "CKM602",
            "cycle",
        ),
    ],
    ids=["two heads", "unknown parent", "two bases", "no base", "a cycle"],
)
def test_graphs_that_are_not_histories(tmp_path, steps, code, said):
    write_history(tmp_path / "m", steps, {})
    with pytest.raises(ckptmap.HistoryError) as e:
        History(tmp_path / "m")
    assert e.value.code == code and said in e.value.message, e.value.render()


def test_folders_that_are_not_histories(tmp_path):
    with pytest.raises(ckptmap.HistoryError, match="not a folder") as e:
        History(tmp_path / "none")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ckptmap.HistoryError, match="no revision steps"):
        History(tmp_path / "empty")
    (tmp_path / "plain").mkdir()
    (tmp_path / "plain" / "r.ckmap").write_text('strip "module."\n')
    with pytest.raises(ckptmap.HistoryError, match='starts with `revision "ID"`') as e:
        History(tmp_path / "plain")
    assert e.value.code == "CKM601"
    twice = write_history(tmp_path / "twice", [("a", (), "")], {})
    (twice / "again.ckmap").write_text('revision "a"\n')
    with pytest.raises(ckptmap.HistoryError, match="declared twice"):
        History(twice)
    with pytest.raises(ckptmap.UsageError):
        History(42)  # type: ignore[arg-type]


def test_a_revision_needs_a_schema(tmp_path):
    h = History(write_history(tmp_path / "a", [("a", (), "")], {}))
    with pytest.raises(ckptmap.HistoryError, match="has no schema") as e:
        h.schema("a")
    assert e.value.code == "CKM604"
    v1 = meta_of(v1_state())
    h = History(
        write_history(tmp_path / "b", [("a", (), ""), ("b", ("a",), 'init "extra"\n')], {"a": v1})
    )
    with pytest.raises(ckptmap.HistoryError, match=r"adds tensors \(init\) but has no schema"):
        h.schema("b")
    (tmp_path / "b" / "a.schema.json").write_text(
        '{"ckptmap_schema": 1, "tensors": {"w": {"shape": [-1]}}}'
    )
    with pytest.raises(ckptmap.HistoryError, match="w: not"):
        History(tmp_path / "b").schema("a")


def test_a_step_that_does_not_hold_is_named_by_check(tmp_path):
    v1 = meta_of(v1_state())
    h = History(
        write_history(
            tmp_path / "m",
            [("a", (), ""), ("b", ("a",), 'rename "layers" -> "blocks"\nrename "heads" -> "x"\n')],
            {"a": v1},
        )
    )
    with pytest.raises(ckptmap.HistoryError) as e:
        h.check()
    assert e.value.code == "CKM603"
    assert any('rename "heads" -> "x"' in d for d in e.value.details), e.value.render()


# --- the walls: each step in its own scope -------------------------------------------------


def test_an_init_in_one_step_and_a_rename_in_the_next(tmp_path):
    """v1 -> v2 adds layers.2 (init), v2 -> v3 renames layers to blocks: as one pipeline
    this was 'missing' and an unused init; as steps it composes."""
    v1 = meta_of(v1_state())
    v2 = dict(v1) | {f"layers.2.{p}": TensorMeta((4, 4), "float32") for p in "qkv"}
    h = History(
        write_history(
            tmp_path / "m",
            [
                ("v1", (), ""),
                ("v2", ("v1",), 'init "layers.2" | zeros()\n'),
                ("v3", ("v2",), 'rename "layers" -> "blocks"\n'),
            ],
            {"v1": v1, "v2": v2},
        )
    )
    sd, report = h.upgrade(v1_state())
    assert sorted(sd) == sorted(k.replace("layers", "blocks") for k in v2)
    assert torch.equal(sd["blocks.2.q"], torch.zeros(4, 4))
    assert torch.equal(sd["blocks.0.q"], v1_state()["layers.0.q"])
    assert [e.target for e in report.initialized] == ["blocks.2.k", "blocks.2.q", "blocks.2.v"]
    assert report.accounts_for(v1_state(), sd)
    # the report names each step's rule that changed a key, with its file
    loaded = {e.target: [r.text for r in e.rules] for e in report.loaded}
    assert loaded["blocks.0.q"] == ['rename "layers" -> "blocks"']
    initialized = report.initialized[0]
    assert [(r.text, Path(r.file).name) for r in initialized.rules] == [
        ('rename "layers" -> "blocks"', "v3.ckmap"),
        ('init "layers.2" | zeros()', "v2.ckmap"),  # the deciding rule, last
    ]


def test_a_file_at_a_revision_is_complete_for_it(tmp_path):
    h = four_steps(tmp_path / "m")
    save_file(v1_state(), tmp_path / "v1.safetensors")
    h.write(tmp_path / "v1.safetensors", tmp_path / "v3.safetensors", "0003-add-layer")
    got = load_file(tmp_path / "v3.safetensors")
    assert meta_of(got) == h.schema("0003-add-layer")
    g = torch.Generator().manual_seed(tensor_seed(7, "blocks.2.q"))
    assert not torch.equal(got["blocks.2.q"], got["blocks.2.k"])  # one seed, many tensors
    assert torch.allclose(
        got["blocks.2.q"], (torch.randn(4, 4, generator=g, dtype=torch.float64) * 0.02).float()
    )


def adding(tmp_path: Path, key: str, body: str) -> History:
    """A history whose one step (`body`) adds `key` [3] to v1, with v1 saved beside it."""
    v1 = meta_of(v1_state())
    v2 = dict(v1) | {key: TensorMeta((3,), "float32")}
    save_file(v1_state(), tmp_path / "v1.safetensors")
    steps = [("v1", (), ""), ("v2", ("v1",), body)]
    return History(write_history(tmp_path / "m", steps, {"v1": v1, "v2": v2}))


def test_tensors_no_fill_and_no_model_can_make_are_refused(tmp_path):
    h = adding(tmp_path, "extra.w", 'init "extra"\n')
    v2 = h.schema("v2")
    with pytest.raises(ckptmap.HistoryError) as e:
        h.write(tmp_path / "v1.safetensors", tmp_path / "v2.safetensors")
    assert e.value.code == "CKM606", e.value.render()
    assert e.value.details == ["extra.w (introduced with no fill)"]
    assert not (tmp_path / "v2.safetensors").exists()

    class V2(torch.nn.Module):
        def __init__(self):
            super().__init__()
            for k, m in v2.items():
                self.register_buffer(k.replace(".", "_"), torch.full(m.shape, 3.0))

        def state_dict(self, *a, **kw):
            return {k: torch.full(m.shape, 3.0) for k, m in v2.items()}

    plan, _ = h.write(tmp_path / "v1.safetensors", tmp_path / "v2.safetensors", model=V2())
    got = load_file(tmp_path / "v2.safetensors")
    assert torch.equal(got["extra.w"], torch.full((3,), 3.0))
    assert torch.equal(got["head.bias"], v1_state()["head.bias"])
    report = plan.report()
    assert [(e.sources, e.target) for e in report.loaded if e.target == "extra.w"] == [
        (["model:extra.w"], "extra.w")
    ]
    assert json.loads(stamp(tmp_path / "v2.safetensors")["ckptmap.chain"]) == [
        {
            "revision": "v2",
            "rules": h.steps["v2"].program.fingerprint,
            "direction": "upgrade",
            "made": ["extra.w: the model's"],
        }
    ]


# --- identification -----------------------------------------------------------------------------


def test_a_checkpoints_revision_by_stamp_schema_or_nearest(tmp_path):
    h = four_steps(tmp_path / "m")
    save_file(v1_state(), tmp_path / "v1.safetensors")
    found = h.current(tmp_path / "v1.safetensors")
    assert (found.revision, found.how) == ("0001-base", "schema")
    h.write(tmp_path / "v1.safetensors", tmp_path / "v5.safetensors")
    found = h.current(tmp_path / "v5.safetensors")
    assert (found.revision, found.how) == ("0005-fuse-qkv", "stamp")
    assert "stamped" in str(found)
    almost = v1_state()
    del almost["head.bias"]
    almost["layers.0.q"] = torch.zeros(5, 4)
    found = h.current(almost)
    assert found.revision is None and found.nearest[0][0] == "0001-base"
    assert found.nearest[0][1] == [
        "1 missing (head.bias)",
        "1 of another shape (layers.0.q: [5, 4], the schema [4, 4])",
    ]
    with pytest.raises(ckptmap.HistoryError) as e:
        h.upgrade(almost)
    assert e.value.code == "CKM605" and "0001-base: 1 missing (head.bias)" in e.value.render()


def test_two_revisions_with_one_schema_are_not_guessed(tmp_path):
    sd = {"w": torch.randn(3, 3)}
    h = History(
        write_history(
            tmp_path / "m",
            [("a", (), ""), ("b", ("a",), 'transform "w" | transpose(0, 1)\n')],
            {"a": meta_of(sd)},
        )
    )
    found = h.current(sd)
    assert found.revision is None and "it matches a, b, whose schemas are the same" in str(found)
    with pytest.raises(ckptmap.HistoryError, match="--from"):
        h.upgrade(sd)
    up, _ = h.upgrade(sd, from_="a")
    assert torch.equal(up["w"], sd["w"].t())


def test_wrong_revision_refusals(tmp_path):
    h = four_steps(tmp_path / "m")
    save_file(v1_state(), tmp_path / "v1.safetensors")
    h.write(tmp_path / "v1.safetensors", tmp_path / "v3.safetensors", "0003-add-layer")
    with pytest.raises(ckptmap.HistoryError, match="already at 0003-add-layer"):
        h.upgrade(tmp_path / "v3.safetensors", "0003-add-layer")
    with pytest.raises(ckptmap.HistoryError, match="newer than 0002-rename") as e:
        h.upgrade(tmp_path / "v3.safetensors", "0002-rename")
    assert e.value.code == "CKM605"
    with pytest.raises(ckptmap.HistoryError, match="is not older") as e:
        h.downgrade(tmp_path / "v3.safetensors", "head")
    # a file from a later revision than this history's head: the history does not know it
    later = write_history(
        tmp_path / "later",
        [
            *[(s.id, s.parents, s.file.read_text().split("\n", 2)[2]) for s in h.steps.values()],
            ("0006-more", ("0005-fuse-qkv",), 'rename "head" -> "classifier"\n'),
        ],
        {"0001-base": h.schema("0001-base"), "0003-add-layer": h.schema("0003-add-layer")},
    )
    History(later).write(tmp_path / "v1.safetensors", tmp_path / "v6.safetensors")
    with pytest.raises(ckptmap.HistoryError) as e:
        h.upgrade(tmp_path / "v6.safetensors")
    assert (
        e.value.code == "CKM605"
        and "'0006-more', a revision this history does not have" in e.value.render()
    )
    result = runner.invoke(
        app, ["current", str(tmp_path / "v6.safetensors"), "--history", str(tmp_path / "m")]
    )
    assert result.exit_code == 1
    assert "stamped '0006-more', a revision this history does not have" in result.output


# --- composition: one plan equals the steps one by one ------------------------------------------


def test_a_chain_is_one_plan_and_one_pass(tmp_path):
    h = four_steps(tmp_path / "m")
    plan = h.plan(v1_state())
    assert (
        plan.ok
        and len(plan.sources) == 8
        and {o.target for o in plan.outputs} == set(h.schema("head"))
    )
    again = ckptmap.Plan.from_json(plan.to_json())  # plain data, fingerprinted
    assert again.fingerprint == plan.fingerprint
    assert h.plan(v1_state()).fingerprint == plan.fingerprint  # deterministic


def test_upgrading_through_steps_is_byte_identical_to_one_upgrade(tmp_path):
    h = four_steps(tmp_path / "m")
    save_file(v1_state(), tmp_path / "a.safetensors")
    h.write(tmp_path / "a.safetensors", tmp_path / "c.safetensors")
    h.write(tmp_path / "a.safetensors", tmp_path / "b.safetensors", "0003-add-layer")
    h.write(tmp_path / "b.safetensors", tmp_path / "c2.safetensors")
    assert tensor_bytes(tmp_path / "c.safetensors") == tensor_bytes(tmp_path / "c2.safetensors")
    stamps = [stamp(tmp_path / n) for n in ("c.safetensors", "c2.safetensors")]
    assert stamps[0] == stamps[1]
    assert [hop["revision"] for hop in json.loads(stamps[1]["ckptmap.chain"])] == [
        "0002-rename",
        "0003-add-layer",
        "0004-grow-head",
        "0005-fuse-qkv",
    ]  # a file made in two hops shows both
    hop = json.loads(stamps[1]["ckptmap.chain"])[1]
    assert hop["made"] == [f"blocks.2.{p}: normal(0, 0.02, 7)" for p in "kqv"]
    back = tmp_path / "back.safetensors"
    h.write(tmp_path / "b.safetensors", back, "0002-rename", downgrade=True, allow_lossy=True)
    assert stamp(back)["ckptmap.revision"] == "0002-rename"
    assert json.loads(stamp(back)["ckptmap.chain"])[-1] == {
        "revision": "0003-add-layer",
        "rules": h.steps["0003-add-layer"].program.fingerprint,
        "direction": "downgrade",
    }


def tensor_bytes(path: Path) -> dict[str, bytes]:
    with safe_open(path, "pt") as f:
        return {
            k: f.get_tensor(k).numpy().tobytes() + str(f.get_tensor(k).dtype).encode()
            for k in f.keys()  # noqa: SIM118 (safe_open has keys(), no __iter__)
        }


def stamp(path: Path) -> dict[str, str]:
    with safe_open(path, "pt") as f:
        meta = f.metadata()
    return {
        k: v
        for k, v in meta.items()
        if k in ("ckptmap.revision", "ckptmap.history", "ckptmap.chain")
    }


def test_downgrade_refuses_what_it_would_lose(tmp_path):
    h = four_steps(tmp_path / "m")
    head, _ = h.upgrade(v1_state())
    with pytest.raises(ckptmap.PlanError) as e:
        h.downgrade(head, "0001-base")
    said = e.value.render()
    assert e.value.code == "CKM308"
    assert "pad's added rows would be dropped" in said and "0004-grow-head.ckmap" in said
    assert "a revision introduced it, and the way back drops it" in said
    back, report = h.downgrade(head, "0001-base", allow_lossy=True)
    assert meta_of(back) == h.schema("0001-base")
    for k, v in v1_state().items():
        assert torch.equal(back[k], v), k
    assert report.warnings


@st.composite
def chains(draw):
    """A random history of exact steps over a few tensors: renames, prefixes, transposes,
    widening casts, q/k fuses and their splits."""
    names = ["a", "b"]
    steps = []
    fused = False
    for n in range(draw(st.integers(1, 5))):
        kind = draw(st.sampled_from(["rename", "transpose", "fuse", "prefix"]))
        if kind == "rename":
            old, new = draw(st.sampled_from(names)), f"r{n}"
            names = [new if x == old else x for x in names]
            fused = new if fused == old else fused
            body = f'rename "{old}" -> "{new}"\n'
        elif kind == "transpose":
            body = f'transform "{draw(st.sampled_from(names))}.w" | transpose(0, 1)\n'
        elif kind == "prefix":
            names = [f"p{n}.{x}" for x in names]
            fused = f"p{n}.{fused}" if fused else fused
            body = f'prefix "p{n}."\n'
        elif not fused:
            x = draw(st.sampled_from(names))
            body = f'merge "{x}.q", "{x}.k" -> "{x}.qk" | cat(0)\n'
            fused = x
        else:
            x = fused
            body = f'split "{x}.qk" -> "{x}.q", "{x}.k" | split([2, 2], 0)\n'
            fused = False
        steps.append(body)
    return steps


def _chain_history(folder: Path, bodies: list[str], start: dict) -> History:
    steps = [("s0", (), "")]
    for i, body in enumerate(bodies, 1):
        steps.append((f"s{i}", (f"s{i - 1}",), body))
    return History(write_history(folder, steps, {"s0": meta_of(start)}))


def _start_state(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for x in ("a", "b"):
        out[f"{x}.w"] = torch.randn(3, 5, generator=g)
        out[f"{x}.h"] = torch.randn(4, generator=g).half()
        out[f"{x}.q"] = torch.randn(2, 3, generator=g)
        out[f"{x}.k"] = torch.randn(2, 3, generator=g)
    return out


@given(chains(), st.integers(0, 3))
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_composition_equals_the_steps_one_by_one(bodies, seed):
    """upgrade(a -> c) == upgrade(b -> c) after upgrade(a -> b), for every b between; and
    where every step is exact, downgrade after upgrade gives the source back bit for bit."""
    start = _start_state(seed)
    with tempfile.TemporaryDirectory() as tmp:
        try:
            h = _chain_history(Path(tmp) / "m", bodies, start)
            h.check()
        except ckptmap.CkptmapError:
            return  # a random step that does not hold (a cast of a tensor already cast, ...)
        whole, _ = h.upgrade(start, from_="s0")
        for mid in h.order[1:-1]:
            first, _ = h.upgrade(start, mid, from_="s0")
            rest, _ = h.upgrade(first, from_=mid)
            assert rest.keys() == whole.keys()
            for k in whole:
                assert rest[k].dtype == whole[k].dtype and torch.equal(rest[k], whole[k]), (mid, k)
        back, _ = h.downgrade(whole, "s0", from_=h.head)
        assert back.keys() == start.keys()
        for k, v in start.items():
            assert back[k].dtype == v.dtype and torch.equal(back[k], v), k


def test_a_branchy_history_with_a_merge(tmp_path):
    sd = {"w": torch.randn(2, 3), "b": torch.randn(3)}
    h = History(
        write_history(
            tmp_path / "m",
            [
                ("root", (), ""),
                ("left", ("root",), 'rename "w" -> "weight"\n'),
                ("right", ("root",), 'rename "b" -> "bias"\n'),
                (
                    "joined",
                    ("left", "right"),
                    'rename "w" -> "weight"\nrename "b" -> "bias"\n',
                ),
            ],
            {"root": meta_of(sd)},
        )
    )
    assert h.head == "joined" and sorted(h.children["root"]) == ["left", "right"]
    assert {s.revision for s in h.check()} == {"root", "left", "right", "joined"}
    from_left, _ = h.upgrade(h.upgrade(sd, "left")[0])
    from_right, _ = h.upgrade(h.upgrade(sd, "right")[0])
    direct, _ = h.upgrade(sd)
    assert sorted(from_left) == sorted(from_right) == sorted(direct) == ["bias", "weight"]
    assert h.path_between("root", "joined") == ["left", "joined"]  # shortest, ties by id
    assert torch.equal(from_right["weight"], sd["w"])


# --- loading ------------------------------------------------------------------------------------


def staged_history(folder: Path) -> History:
    """ResNet (torchvision's names) refactored into StagedResNet: stem, stages, head."""
    return History(
        write_history(
            folder,
            [
                ("0001-resnet", (), ""),
                (
                    "0002-staged",
                    ("0001-resnet",),
                    'rename "conv1" -> "stem.0"\nrename "bn1" -> "stem.1"\n'
                    'rename "layer{i}" -> "stages.{i}.blocks"\nrename "fc" -> "head"\n',
                ),
            ],
            {"0001-resnet": meta_of(ResNet(1000).state_dict())},
        )
    )


def test_load_into_goes_through_the_history(tmp_path):
    h = staged_history(tmp_path / "m")
    torch.manual_seed(0)
    old = ResNet(1000).state_dict()
    save_file(old, tmp_path / "old.safetensors")
    model = StagedResNet(1000)
    report = ckptmap.load_into(model, tmp_path / "old.safetensors", h)
    assert torch.equal(model.head.weight, old["fc.weight"])
    assert torch.equal(model.stages["2"].blocks[0].conv1.weight, old["layer2.0.conv1.weight"])
    assert report.accounts_for(old, model.state_dict())
    # a checkpoint already at the model's revision loads as it is
    again = StagedResNet(1000)
    ckptmap.load_into(again, model.state_dict(), h)
    assert torch.equal(again.head.weight, old["fc.weight"])


def test_upgrade_on_load_hooks_load_state_dict(tmp_path):
    h = staged_history(tmp_path / "m")
    torch.manual_seed(0)
    old = ResNet(1000).state_dict()
    keys_before = list(old)
    model = StagedResNet(1000)
    handle = ckptmap.upgrade_on_load(model, h)
    result = model.load_state_dict(old)  # what a framework's resume calls
    assert not result.missing_keys and not result.unexpected_keys
    assert torch.equal(model.stem[0].weight, old["conv1.weight"])
    assert list(old) == keys_before  # the caller's dict is not changed
    model.load_state_dict(model.state_dict())  # already at the model's revision: as it is
    bad = dict(old)
    bad["fc.weight"] = torch.zeros(3, 3)
    with pytest.raises(RuntimeError):  # no revision's schema: torch's own strict check says so
        model.load_state_dict(bad)
    handle.remove()
    with pytest.raises(RuntimeError):
        model.load_state_dict(old)


# --- the command line, end to end ---------------------------------------------------------------


def test_cli_from_a_new_history_to_an_upgraded_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "mymodels.py").write_text(
        "import torch\n"
        "def v1():\n    return torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 10))\n"
        "def v3():\n"
        "    m = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 10))\n"
        "    m.add_module('extra', torch.nn.Linear(4, 2))\n    return m\n"
    )
    torch.manual_seed(0)
    import importlib
    import sys

    sys.path.insert(0, str(tmp_path))
    try:
        mymodels = importlib.import_module("mymodels")
        save_file(mymodels.v1().state_dict(), tmp_path / "v1.safetensors")
    finally:
        sys.path.remove(str(tmp_path))
    result = runner.invoke(app, ["revision", "mig", "-m", "The base", "--base", "mymodels:v1"])
    assert result.exit_code == 0, result.output
    assert result.output.splitlines() == [
        "wrote mig/0001-the-base.ckmap",
        "wrote mig/0001-the-base.schema.json",
    ]
    result = runner.invoke(app, ["revision", "mig", "-m", "rename the head", "--id", "0002-head"])
    assert result.exit_code == 0, result.output
    text = (tmp_path / "mig" / "0002-head.ckmap").read_text()
    assert 'revision "0002-head" from "0001-the-base"' in text
    (tmp_path / "mig" / "0002-head.ckmap").write_text(text + 'rename "1" -> "head"\n')
    result = runner.invoke(app, ["revision", "mig", "-m", "extra", "-t", "mymodels:v3"])
    assert result.exit_code == 0, result.output
    step3 = tmp_path / "mig" / "0003-extra.ckmap"
    step3.write_text(step3.read_text() + 'rename "head" -> "1"\ninit "extra" | zeros()\n')
    assert runner.invoke(app, ["revision", "mig", "-m", "x", "--id", "0003-extra"]).exit_code == 2

    result = runner.invoke(app, ["check", "mig"])
    assert (
        result.exit_code == 0
        and "mig: ok, 3 revisions from 0001-the-base to 0003-extra" in result.output
    )
    result = runner.invoke(app, ["history", "mig"])
    assert result.output.splitlines() == [
        "mig: 3 revisions, base 0001-the-base, head 0003-extra",
        "@ 0003-extra     from 0002-head: 2 renamed, 2 added",
        "o 0002-head      from 0001-the-base: 2 renamed",
        "o 0001-the-base  base, 4 tensors",
    ]
    result = runner.invoke(app, ["current", "v1.safetensors", "--history", "mig"])
    assert result.exit_code == 0 and "0001-the-base (its names, shapes and dtypes" in result.output
    result = runner.invoke(
        app, ["upgrade", "v1.safetensors", "--history", "mig", "-o", "v3.safetensors"]
    )
    assert result.exit_code == 0, result.output
    assert "wrote v3.safetensors at 0003-extra" in result.output
    got = load_file(tmp_path / "v3.safetensors")
    assert torch.equal(got["extra.weight"], torch.zeros(2, 4))
    result = runner.invoke(app, ["inspect", "v3.safetensors"])
    assert "revision: 0003-extra (history sha256:" in result.output
    assert "made by: +0002-head +0003-extra" in result.output
    result = runner.invoke(app, ["current", "v3.safetensors", "--history", "mig"])
    assert "0003-extra (from the revision stamped in its metadata)" in result.output

    back = [
        "downgrade",
        "v3.safetensors",
        "--history",
        "mig",
        "--to",
        "base",
        "-o",
        "v1b.safetensors",
    ]
    result = runner.invoke(app, back)
    assert result.exit_code == 1 and "error[CKM308]" in result.output
    assert not (tmp_path / "v1b.safetensors").exists()
    result = runner.invoke(app, [*back, "--allow-lossy"])
    assert result.exit_code == 0, result.output
    assert tensor_bytes(tmp_path / "v1b.safetensors") == tensor_bytes(tmp_path / "v1.safetensors")
    # no input is ever written: not the source, not a step of the history
    result = runner.invoke(
        app,
        [
            "upgrade",
            "v1.safetensors",
            "--history",
            "mig",
            "-o",
            "mig/0002-head.ckmap",
            "--overwrite",
        ],
    )
    assert (
        result.exit_code == 2 and "refusing to write over the history folder mig" in result.output
    )
    result = runner.invoke(
        app,
        [
            "upgrade",
            "v1.safetensors",
            "--history",
            "mig",
            "-o",
            "v3b.safetensors",
            "--report",
            "mig/report.json",
        ],
    )
    assert result.exit_code == 2 and "history folder" in result.output  # it would become a step
    assert not (tmp_path / "mig" / "report.json").exists()
    result = runner.invoke(app, ["upgrade", "v1.safetensors", "--history", "mig", "-o", "v3.pt"])
    assert result.exit_code == 2 and "where its revision stamp is kept" in result.output
    result = runner.invoke(
        app, ["upgrade", "v1.safetensors", "--history", "mig", "-o", "v3.safetensors"]
    )
    assert result.exit_code == 2 and "CKM533" in result.output
    result = runner.invoke(app, ["current", "v3.safetensors", "--history", "nope"])
    assert result.exit_code == 2 and "CKM601" in result.output


def test_cli_current_of_an_unknown_checkpoint_exits_1(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    four_steps(tmp_path / "m")
    save_file({"other": torch.zeros(2)}, tmp_path / "x.safetensors")
    result = runner.invoke(app, ["current", "x.safetensors", "--history", "m"])
    assert result.exit_code == 1
    assert "no revision's schema matches exactly; nearest:" in result.output


def test_cli_check_names_the_step_that_does_not_hold(tmp_path):
    v1 = meta_of(v1_state())
    write_history(
        tmp_path / "m", [("a", (), ""), ("b", ("a",), 'rename "nothing" -> "x"\n')], {"a": v1}
    )
    result = runner.invoke(app, ["check", str(tmp_path / "m")])
    assert result.exit_code == 2
    assert "error[CKM603]" in result.output and 'rename "nothing" -> "x"' in result.output


def test_apply_of_one_step_refuses_a_file_at_another_revision(tmp_path, monkeypatch):
    """Applying v2->v3's step file to a v1 file once wrote an unchanged copy; a stamped
    file at another revision than the step's parent is refused, and says the way."""
    monkeypatch.chdir(tmp_path)
    h = four_steps(tmp_path / "m")
    save_file(v1_state(), tmp_path / "v1.safetensors")
    h.write(tmp_path / "v1.safetensors", tmp_path / "v2.safetensors", "0002-rename")
    step = str(h.steps["0004-grow-head"].file)
    result = runner.invoke(app, ["apply", step, "-s", "v2.safetensors", "-o", "out.safetensors"])
    assert result.exit_code == 2 and "error[CKM605]" in result.output
    assert (
        "v2.safetensors is at revision 0002-rename (its stamp); 0004-grow-head is a step"
        in result.output
    )
    assert "ckptmap upgrade SOURCE --history FOLDER --to 0004-grow-head" in result.output
    # unstamped, the step's rules meet names they were not written for: unused, exit 1
    fuse = str(h.steps["0005-fuse-qkv"].file)
    result = runner.invoke(app, ["apply", fuse, "-s", "v1.safetensors", "-o", "out.safetensors"])
    assert result.exit_code == 1 and "CKM310" in result.output
    assert not (tmp_path / "out.safetensors").exists()


def test_check_compares_the_result_with_the_schema_dtypes_too(tmp_path):
    sd = {"w": torch.randn(2, 2).half()}
    v2 = {"w": TensorMeta((2, 2), "float16")}
    write_history(
        tmp_path / "m",
        [("a", (), ""), ("b", ("a",), 'transform "w" | cast(float32)\n')],
        {"a": meta_of(sd), "b": v2},
    )
    with pytest.raises(ckptmap.HistoryError) as e:
        History(tmp_path / "m").check()
    assert "the step makes something else than b's schema" in e.value.render()
    assert "1 of another dtype (w: float32, the schema float16)" in e.value.render()


def test_fmt_keeps_a_step_file(tmp_path):
    f = tmp_path / "s.ckmap"
    f.write_text('revision   "0002"   from "0001" ,"0001b"  # the merge\ninit "x"|zeros( )\n')
    assert runner.invoke(app, ["fmt", str(f)]).exit_code == 0
    assert f.read_text() == (
        'ckptmap 1\n\nrevision "0002" from "0001", "0001b"  # the merge\ninit "x" | zeros()\n'
    )


def test_a_bf16_copy_is_at_its_revision_and_upgrades_to_a_loadable_file(tmp_path):
    h = four_steps(tmp_path / "m")
    save_file({k: v.bfloat16() for k, v in v1_state().items()}, tmp_path / "v1.safetensors")
    found = h.current(tmp_path / "v1.safetensors")
    assert found.revision == "0001-base" and "dtypes are not the schema's" in found.note
    h.write(tmp_path / "v1.safetensors", tmp_path / "v2.safetensors", "0002-rename")
    got = load_file(tmp_path / "v2.safetensors")  # a file safetensors reads (bytes = header)
    assert got["blocks.0.q"].dtype == torch.bfloat16
    assert torch.equal(got["blocks.0.q"], v1_state()["layers.0.q"].bfloat16())
    h.write(tmp_path / "v1.safetensors", tmp_path / "v5.safetensors")
    got = load_file(tmp_path / "v5.safetensors")
    assert got["head.weight"].dtype == torch.bfloat16 and got["blocks.2.qkv"].shape == (12, 4)


def test_a_relaxed_step_policy_never_leaves_a_file_incomplete(tmp_path):
    h = adding(tmp_path, "c.weight", "on missing warn\n")
    with pytest.raises(ckptmap.HistoryError) as e:
        h.write(tmp_path / "v1.safetensors", tmp_path / "v2.safetensors")
    assert e.value.code == "CKM606" and e.value.details == [
        "c.weight (missing under a step policy)"
    ]
    assert not (tmp_path / "v2.safetensors").exists()


def test_head_and_base_are_not_ids(tmp_path):
    with pytest.raises(ckptmap.RuleSyntaxError, match="names a history's newest or first"):
        ckptmap.parse('revision "head" from "0001"')
    write_history(tmp_path / "m", [("a", (), "")], {"a": meta_of(v1_state())})
    result = runner.invoke(app, ["revision", str(tmp_path / "m"), "-m", "x", "--id", "base"])
    assert result.exit_code == 2 and "CKM108" in result.output


def linear(tmp_path: Path, sd: dict, steps: list[tuple[str, str]]) -> History:
    """A history of steps one after another: (id, rule lines); the first is the base of
    `sd`'s schema."""
    revs = [(rev, (steps[k - 1][0],) if k else (), body) for k, (rev, body) in enumerate(steps)]
    return History(write_history(tmp_path / "m", revs, {steps[0][0]: meta_of(sd)}))


def test_the_model_given_must_be_at_the_revision_asked(tmp_path):
    sd = {"w": torch.randn(2, 3)}
    h = linear(
        tmp_path, sd, [("a", ""), ("b", 'rename "w" -> "x"\n'), ("c", 'rename "x" -> "y"\n')]
    )
    save_file(sd, tmp_path / "a.safetensors")
    at_b = {"x": TensorMeta((2, 3), "float32")}
    with pytest.raises(
        ckptmap.HistoryError, match=r"the model is at revision b \(its schema\), not c"
    ):
        h.write(tmp_path / "a.safetensors", tmp_path / "c.safetensors", model=at_b)


def test_a_freeze_in_an_earlier_step_follows_its_tensor(tmp_path):
    sd = {"a.weight": torch.randn(2, 2), "b.weight": torch.randn(3, 2)}
    steps = [("v1", ""), ("v2", 'rename "b" -> "y"\nfreeze "y"\n'), ("v3", 'rename "a" -> "x"\n')]
    h = linear(tmp_path, sd, steps)
    model = torch.nn.Module()
    model.x, model.y = torch.nn.Linear(2, 2, bias=False), torch.nn.Linear(2, 3, bias=False)
    report = ckptmap.load_into(model, sd, h)
    assert report.frozen == ["y.weight"] and not model.y.weight.requires_grad
    assert model.x.weight.requires_grad


def test_upgrade_on_load_inside_a_wrapper_and_when_it_cannot_tell(tmp_path):
    h = staged_history(tmp_path / "m")
    torch.manual_seed(0)
    old = ResNet(1000).state_dict()
    wrapper = torch.nn.Module()
    wrapper.model = StagedResNet(1000)  # a Lightning module holds the model as `model.`
    ckptmap.upgrade_on_load(wrapper.model, h)
    wrapper.load_state_dict({f"model.{k}": v for k, v in old.items()})
    assert torch.equal(wrapper.model.head.weight, old["fc.weight"])
    # a square transpose keeps the schema: a state_dict at either revision looks the same
    sd = {"w": torch.randn(3, 3)}
    square = History(
        write_history(
            tmp_path / "sq",
            [("a", (), ""), ("b", ("a",), 'transform "w" | transpose(0, 1)\n')],
            {"a": meta_of(sd)},
        )
    )
    model = torch.nn.Module()
    model.register_parameter("w", torch.nn.Parameter(torch.zeros(3, 3)))
    ckptmap.upgrade_on_load(model, square)
    with pytest.raises(ckptmap.HistoryError, match="matches a, b alike") as e:
        model.load_state_dict(sd)
    assert "from_=REV" in e.value.render()
    assert torch.equal(model.w, torch.zeros(3, 3))
    ckptmap.load_into(model, sd, square, from_="a")  # said which: upgraded
    assert torch.equal(model.w, sd["w"].t())
    with pytest.raises(ckptmap.UsageError, match="keep their own policies"):
        ckptmap.load_into(model, sd, square, from_="a", on_missing="warn")
    with pytest.raises(ckptmap.UsageError, match="goes with a History"):
        ckptmap.load_into(model, sd, "", from_="a")


def test_edges_of_the_history_api(tmp_path, monkeypatch):
    h = four_steps(tmp_path / "m")
    before = h.fingerprint("head")
    snap = tmp_path / "m" / "0003-add-layer.schema.json"
    snap.write_text(snap.read_text().replace('"float32"}', '"float16"}', 1))
    assert History(tmp_path / "m").fingerprint("head") != before  # fills depend on it
    snap.write_text(snap.read_text().replace('"float16"}', '"qint8"}', 1))
    with pytest.raises(ckptmap.HistoryError, match="not"):
        History(tmp_path / "m").schema("0003-add-layer")
    snap.write_text(snap.read_text().replace('"qint8"}', '"float32"}', 1))
    bad = tmp_path / "m" / "0001-base.schema.json"
    text = bad.read_text()
    bad.write_text(text.replace('"ckptmap_schema": 1', '"ckptmap_schema": true'))
    with pytest.raises(ckptmap.HistoryError, match="not a ckptmap schema"):
        History(tmp_path / "m").schema("base")
    bad.write_text(text)
    save_file(v1_state(), tmp_path / "v1.safetensors")
    with pytest.raises(ckptmap.UsageError):
        h.write(tmp_path / "v1.safetensors", None)  # type: ignore[arg-type]
    with pytest.raises(ckptmap.UsageError, match="above 0"):
        h.write(tmp_path / "v1.safetensors", tmp_path / "out", max_shard_size=0)
    # an earlier file's chain that is no list of hops is not carried on
    meta = {"ckptmap.revision": "0001-base", "ckptmap.chain": '"abc"'}
    save_file(v1_state(), tmp_path / "odd.safetensors", metadata=meta)
    h.write(tmp_path / "odd.safetensors", tmp_path / "v2.safetensors", "0002-rename")
    assert [
        hop["revision"] for hop in json.loads(stamp(tmp_path / "v2.safetensors")["ckptmap.chain"])
    ] == ["0002-rename"]
    # revision ids from any message; --base refusals
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(app, ["revision", "m", "-m", "Überschrift ñ 日本語 layers"])
    assert result.exit_code == 0 and "0006-berschrift-layers.ckmap" in result.output, result.output
    (tmp_path / "afile").write_text("x")
    result = runner.invoke(app, ["revision", "afile", "-m", "b", "--base", "v1.safetensors"])
    assert result.exit_code == 2 and "not a folder" in result.output
    result = runner.invoke(app, ["revision", "new", "-m", "b", "--base", "nope.pt"])
    assert result.exit_code == 2 and not (tmp_path / "new").exists()
    result = runner.invoke(
        app, ["revision", "new", "-m", "b", "--base", "v1.safetensors", "-t", "v1.safetensors"]
    )
    assert result.exit_code == 2 and "one" in result.output


def test_normal_fills_floats_only(tmp_path):
    v1 = meta_of(v1_state())
    v2 = dict(v1) | {"steps.count": TensorMeta((1,), "int64")}
    h = History(
        write_history(
            tmp_path / "m",
            [("v1", (), ""), ("v2", ("v1",), 'init "steps" | normal(0, 1, 0)\n')],
            {"v1": v1, "v2": v2},
        )
    )
    with pytest.raises(
        ckptmap.HistoryError, match=r"normal\(\) makes floating-point values, not int64"
    ):
        h.upgrade(v1_state())
