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


# --- 2. a load that fails leaves the model as it was -----------------------------------------

from test_files import write_hf_sharded  # noqa: E402

import ckptmap  # noqa: E402

N_LAYERS = 5
WHERE = {"first": 0, "middle": 2, "last": N_LAYERS - 1}


def _model() -> torch.nn.Sequential:
    torch.manual_seed(1)
    layers = []
    for _ in range(N_LAYERS):
        layers += [torch.nn.Linear(8, 8), torch.nn.BatchNorm1d(8)]
    return torch.nn.Sequential(*layers)


def _layer(model: torch.nn.Sequential, where: str) -> torch.nn.Module:
    return model[2 * WHERE[where]]


def _snapshot(model: torch.nn.Module) -> dict:
    return {
        "tensors": {k: v.detach().clone() for k, v in model.state_dict(keep_vars=True).items()},
        "objects": [id(t) for t in model.state_dict(keep_vars=True).values()],
        "flags": {n: p.requires_grad for n, p in model.named_parameters()},
    }


def _same(model: torch.nn.Module, before: dict) -> bool:
    now = _snapshot(model)
    return (
        now["objects"] == before["objects"]
        and now["flags"] == before["flags"]
        and now["tensors"].keys() == before["tensors"].keys()
        and all(
            now["tensors"][k].dtype == v.dtype and torch.equal(now["tensors"][k], v)
            for k, v in before["tensors"].items()
        )
    )


def _pretrained() -> dict[str, torch.Tensor]:
    torch.manual_seed(2)
    return {k: torch.randn_like(v.float()).to(v.dtype) for k, v in _model().state_dict().items()}


@pytest.fixture(params=["state_dict", "safetensors", "pt", "sharded"])
def source(request, tmp_path):
    sd = _pretrained()
    if request.param == "state_dict":
        return sd
    if request.param == "safetensors":
        save_file(sd, tmp_path / "w.safetensors")
        return tmp_path / "w.safetensors"
    if request.param == "pt":
        torch.save(sd, tmp_path / "w.pt")
        return tmp_path / "w.pt"
    return write_hf_sharded(tmp_path / "sharded", sd, shards=3)


class Boom(RuntimeError):
    pass


def _raise_in_load(module):
    original = module._load_from_state_dict

    def load(*args, **kwargs):
        original(*args, **kwargs)  # it writes its tensors first, then fails
        raise Boom("the module's own code failed")

    module._load_from_state_dict = load


def _report_an_error(module):
    original = module._load_from_state_dict

    def load(state_dict, prefix, local_metadata, strict, missing, unexpected, errors):
        original(state_dict, prefix, local_metadata, strict, missing, unexpected, errors)
        errors.append(f"{prefix}weight: size mismatch, the module says [9, 9]")

    module._load_from_state_dict = load


FAULTS = {
    "_load_from_state_dict raises": _raise_in_load,
    "_load_from_state_dict reports an error": _report_an_error,
    "a load pre-hook raises": lambda m: m._register_load_state_dict_pre_hook(
        lambda *a: (_ for _ in ()).throw(ValueError("pre-hook"))
    ),
    "a load post-hook raises": lambda m: m.register_load_state_dict_post_hook(
        lambda *a: (_ for _ in ()).throw(ValueError("post-hook"))
    ),
    "Ctrl-C in a hook": lambda m: m.register_load_state_dict_post_hook(
        lambda *a: (_ for _ in ()).throw(KeyboardInterrupt())
    ),
}


@pytest.mark.parametrize("where", list(WHERE))
@pytest.mark.parametrize("fault", list(FAULTS))
def test_any_failure_during_the_load_leaves_the_model_as_it_was(source, fault, where):
    model = _model()
    before = _snapshot(model)
    FAULTS[fault](_layer(model, where))
    expected = KeyboardInterrupt if "Ctrl-C" in fault else ckptmap.LoadError
    with pytest.raises(expected) as info:
        ckptmap.load_into(model, source, 'freeze "**"')
    assert _same(model, before), fault
    if expected is ckptmap.LoadError:
        assert "the model is as it was" in info.value.message
        if fault != "_load_from_state_dict reports an error":
            assert f"module '{2 * WHERE[where]}'" in info.value.message
            assert info.value.__cause__ is not None  # the original, as the cause


def test_a_file_cut_short_during_the_load_leaves_the_model_as_it_was(tmp_path):
    path = tmp_path / "w.safetensors"
    save_file(_pretrained(), path)
    model = _model()
    before = _snapshot(model)
    # the file shrinks while the load runs (after the first layer has been read)
    _layer(model, "first").register_load_state_dict_post_hook(
        lambda *a: os.truncate(path, path.stat().st_size // 2)
    )
    with pytest.raises(ckptmap.CkptmapError):
        ckptmap.load_into(model, path, "")
    assert _same(model, before)


_UNLOADABLE = {
    "quantized": lambda t: torch.quantize_per_tensor(t, 0.1, 0, torch.qint8),
    "meta": lambda t: torch.empty_like(t, device="meta"),
    "sparse": lambda t: t.to_sparse(),
}


@pytest.mark.filterwarnings("ignore:torch.quantize_per_tensor")
@pytest.mark.parametrize(
    ("kind", "bad"),
    # torch.save cannot write a meta tensor: that one comes only in a state_dict
    [("state_dict", b) for b in _UNLOADABLE] + [("pt", "quantized"), ("pt", "sparse")],
)
def test_tensors_no_parameter_can_take_are_refused_before_any_write(tmp_path, bad, kind):
    sd = _pretrained()
    last = f"{2 * (N_LAYERS - 1)}.weight"
    sd[last] = _UNLOADABLE[bad](sd[last])
    source: object = sd
    if kind == "pt":
        torch.save(sd, tmp_path / "w.pt")
        source = tmp_path / "w.pt"
    model = _model()
    before = _snapshot(model)
    with pytest.raises(ckptmap.CkptmapError) as info:
        ckptmap.load_into(model, source, "")
    assert _same(model, before)
    assert last in str(info.value)


def test_transactional_false_says_the_model_may_be_partly_loaded():
    model = _model()
    _raise_in_load(_layer(model, "middle"))
    with pytest.raises(ckptmap.LoadError, match="may be partly loaded"):
        ckptmap.load_into(model, _pretrained(), "", transactional=False)


# --- 3. a corrupt file is refused, never read as wrong weights ------------------------------

import zipfile  # noqa: E402


def _rezip(src: Path, dst: Path, *, compress: int = zipfile.ZIP_STORED, cut: str | None = None):
    """A copy of a torch zip: records compressed, or one record cut to 8 bytes."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", compress) as zout:
        for info in zin.infolist():
            data = zin.read(info.filename)
            if cut is not None and info.filename.endswith(cut):
                data = data[:8]
            zout.writestr(info.filename, data, compress_type=compress)


def test_a_pt_record_shorter_than_its_tensor_is_refused(tmp_path):
    good = tmp_path / "good.pt"
    torch.save({"w": torch.arange(16, dtype=torch.float32)}, good)
    bad = tmp_path / "bad.pt"
    _rezip(good, bad, cut="/data/0")
    for command in (["inspect", bad], ["plan", tmp_path / "r.ckmap", "-s", bad]):
        (tmp_path / "r.ckmap").write_text("")
        output = _run(*command, status=2)
        assert "CKM525" in output and "holds 8 bytes but its tensors need 64" in output
    with pytest.raises(ckptmap.CheckpointError, match="CKM525"):
        ckptmap.migrate(bad, "")


def test_a_compressed_pt_reads_the_right_values(tmp_path):
    good = tmp_path / "good.pt"
    w = torch.randn(64, 8)
    torch.save({"w": w}, good)
    deflated = tmp_path / "deflated.pt"
    _rezip(good, deflated, compress=zipfile.ZIP_DEFLATED)
    assert torch.equal(torch.load(deflated, weights_only=True)["w"], w)  # torch reads it right
    new_sd, _ = ckptmap.migrate(deflated, "")
    assert torch.equal(new_sd["w"], w)


def _safetensors_with_header(path: Path, header: str, data: bytes) -> None:
    raw = header.encode()
    path.write_bytes(len(raw).to_bytes(8, "little") + raw + data)


def test_a_name_given_twice_in_a_safetensors_header_is_refused(tmp_path):
    path = tmp_path / "dup.safetensors"
    entry = '"w": {{"dtype": "F32", "shape": [1], "data_offsets": [{}, {}]}}'
    _safetensors_with_header(path, f"{{{entry.format(0, 4)}, {entry.format(4, 8)}}}", bytes(8))
    output = _run("inspect", path, status=2)
    assert "names 'w' twice" in output


def test_a_name_given_twice_in_a_shard_index_is_refused(tmp_path):
    folder = write_hf_sharded(tmp_path / "hf", _pretrained(), shards=2)
    index = folder / "model.safetensors.index.json"
    doc = json.loads(index.read_text())
    second = sorted(set(doc["weight_map"].values()))[1]
    text = index.read_text().replace(
        '"weight_map": {', f'"weight_map": {{"0.weight": "{second}", ', 1
    )
    index.write_text(text)
    assert "names '0.weight' twice" in _run("inspect", folder, status=2)


# --- 6. fmt never changes what a file means ---------------------------------------------------


@pytest.mark.parametrize("odd", ["\f", "\x85", "\u2028", "\t\f "])
def test_fmt_keeps_a_file_with_odd_whitespace_parsing(tmp_path, odd):
    path = tmp_path / "r.ckmap"
    blank = odd if odd.strip(" \t\f") == "" else "\f"  # the grammar's blanks: space, tab, \f
    text = f'ckptmap 1\n{blank}\n# section two{odd}: wrappers\nstrip "module."  # ddp{odd}\n'
    path.write_text(text)
    before = ckptmap.load_rules(path)
    _run("fmt", path, status=0)
    after = path.read_text()
    assert ckptmap.load_rules(path) == before, after
    _run("fmt", "--check", path, status=0)  # a second pass changes nothing


# --- 4 and 5. hostile input: bounded work, one line, exit 2 -------------------------------------

import stat  # noqa: E402
import time  # noqa: E402

ENTRY = '{{"dtype": "F32", "shape": {shape}, "data_offsets": [0, {size}]}}'


def _header_file(path: Path, header: str, data: bytes = b"") -> Path:
    _safetensors_with_header(path, header, data)
    return path


def _one_line_exit_2(*args) -> str:
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code == 2, result.output
    assert ("Traceback" not in result.output and result.exception is None) or isinstance(
        result.exception, SystemExit
    ), result.output
    return result.output


HOSTILE_HEADERS = {
    "a dtype that is a list": '{"w": {"dtype": ["F32"], "shape": [1], "data_offsets": [0, 4]}}',
    "a header nested deeply": '{"w": ' + "[" * 100000 + "]" * 100000 + "}",
    "an integer of 5000 digits": '{"w": {"dtype": "F32", "shape": ['
    + "9" * 5000
    + '], "data_offsets": [0, 4]}}',
    "aliases naming __metadata__": '{"__metadata__": {"ckptmap.aliases": "{\\"x\\": \\"__metadata__\\"}"}, "w": '
    + ENTRY.format(shape="[1]", size=4)
    + "}",
    "aliases nested deeply": '{"__metadata__": {"ckptmap.aliases": "'
    + "[" * 100000
    + '"}, "w": '
    + ENTRY.format(shape="[1]", size=4)
    + "}",
    "a dimension of 2**70": '{"w": {"dtype": "F32", "shape": [0, 1180591620717411303424], "data_offsets": [0, 0]}}',
    "a key of a megabyte": '{"' + "k" * (1 << 20) + '": ' + ENTRY.format(shape="[1]", size=4) + "}",
}


@pytest.mark.parametrize("case", list(HOSTILE_HEADERS))
def test_hostile_safetensors_headers_are_one_line_and_exit_2(tmp_path, case):
    path = _header_file(tmp_path / "h.safetensors", HOSTILE_HEADERS[case], bytes(4))
    start = time.perf_counter()
    for command in (["inspect", path], ["plan", tmp_path / "r.ckmap", "-s", path]):
        (tmp_path / "r.ckmap").write_text("")
        _one_line_exit_2(*command)
    assert time.perf_counter() - start < 5


def test_too_many_keys_are_refused_before_parsing(tmp_path, monkeypatch):
    monkeypatch.setenv("CKPTMAP_MAX_KEYS", "1000")
    entries = ", ".join(f'"k{i}": {ENTRY.format(shape="[0]", size=0)}' for i in range(1001))
    path = _header_file(tmp_path / "many.safetensors", "{" + entries + "}")
    output = _one_line_exit_2("inspect", path)
    assert "more than 1,000 tensors" in output and "CKPTMAP_MAX_KEYS" in output


def test_limits_can_be_raised(tmp_path, monkeypatch):
    long = "k" * 5000
    path = _header_file(
        tmp_path / "long.safetensors",
        f'{{"{long}": {ENTRY.format(shape="[1]", size=4)}}}',
        bytes(4),
    )
    assert "CKPTMAP_MAX_KEY_LENGTH" in _one_line_exit_2("inspect", path)
    monkeypatch.setenv("CKPTMAP_MAX_KEY_LENGTH", "10000")
    assert runner.invoke(app, ["inspect", str(path)]).exit_code == 0


def test_a_key_length_limit_applies_to_state_dicts_too():
    with pytest.raises(ckptmap.CkptmapError, match="CKPTMAP_MAX_KEY_LENGTH"):
        ckptmap.compile("").plan({"k" * 5000: [1]})


PRINT_BREAKERS = ["[/]", "a{1}b", "x." + "7" * 5000 + ".w", "a\ud800", "evil\x1b[2J\x1b[31m", ":x:"]


@pytest.mark.parametrize(
    "name", PRINT_BREAKERS, ids=["markup", "braces", "digits", "surrogate", "csi", "emoji"]
)
def test_key_names_are_printed_verbatim_and_escaped(tmp_path, name, monkeypatch):
    monkeypatch.setenv("CKPTMAP_MAX_KEY_LENGTH", "10000")  # a 5,000-digit index, once allowed
    source: dict = {name: torch.zeros(1), "ok": torch.zeros(1)}
    path = tmp_path / "names.pt"
    torch.save(source, path)  # torch files may hold any str key
    (tmp_path / "r.ckmap").write_text("")
    for command in (["inspect", path], ["plan", tmp_path / "r.ckmap", "-s", path]):
        result = runner.invoke(app, [str(a) for a in command])
        assert result.exit_code == 0 and result.exception is None, result.output
        assert "\x1b" not in result.output  # control characters never reach the terminal raw


HOSTILE_RULES = {
    "a repeat count too big": 'rename /a{9999999999}/ -> "x"',
    "regex groups nested 500 deep": "skip /" + "(" * 500 + "a" + ")" * 500 + "/",
    "op arguments nested 400 deep": 'transform "a" | pad(' + "[" * 400 + "1" + "]" * 400 + ")",
    "a lone surrogate in a regex": "skip /a\ud800/",
}


@pytest.mark.parametrize("case", list(HOSTILE_RULES))
def test_hostile_rule_text_raises_only_ckptmap_errors(case):
    try:
        ckptmap.compile(HOSTILE_RULES[case]).plan({"a": [1]})
    except ckptmap.CkptmapError as e:
        e.render()


HOSTILE_YAML = {
    "billion laughs": "a: &a [x, x, x, x, x, x, x, x, x]\n"
    + "".join(
        f"{chr(98 + i)}: &{chr(98 + i)} [{', '.join('*' + chr(97 + i) for _ in range(9))}]\n"
        for i in range(8)
    )
    + "rules: []\n",
    "nested 1000 deep": "rules: " + "[" * 1000 + "]" * 1000 + "\n",
    "a surrogate in a regex": 'rules:\n  - skip: {regex: "a\\ud800"}\n',
    "an op with two names": "rules:\n  - transform: {from: a, ops: [{transpose: [0, 1], cast: [x]}]}\n",
}


@pytest.mark.parametrize("case", list(HOSTILE_YAML))
def test_hostile_yaml_is_one_line_and_bounded(tmp_path, case):
    path = tmp_path / "r.yaml"
    path.write_text(HOSTILE_YAML[case], encoding="utf-8", errors="surrogatepass")
    start = time.perf_counter()
    result = runner.invoke(app, ["check", str(path)])
    assert time.perf_counter() - start < 5
    assert result.exception is None or isinstance(result.exception, SystemExit), result.output
    assert "Traceback" not in result.output


def test_yaml_aliases_are_refused(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("x: &a {skip: a}\nrules:\n  - *a\n")
    assert "aliases" in _one_line_exit_2("check", path)


def test_a_planned_tensor_larger_than_memory_is_refused_before_allocating(tmp_path):
    sd = {"w": torch.zeros(4)}
    with pytest.raises(ckptmap.CkptmapError, match="this machine has"):
        ckptmap.migrate(sd, 'transform "w" | pad(0, 0, 1000000000000000)')


def test_a_fifo_is_refused_not_waited_on(tmp_path):
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    assert stat.S_ISFIFO(os.stat(fifo).st_mode)
    assert "not a regular file" in _one_line_exit_2("inspect", fifo)
    rules_fifo = tmp_path / "pipe.ckmap"
    os.mkfifo(rules_fifo)
    assert "not a regular file" in _one_line_exit_2("check", rules_fifo)


@pytest.mark.parametrize(
    "shapes",
    [
        '{"w": [-1]}',
        '{"w": [2.7]}',
        '{"w": "12"}',
        '{"w": [true, false]}',
        '{"w": [1e999]}',
        "[" * 100000 + "]" * 100000,
    ],
)
def test_a_target_json_is_validated(tmp_path, shapes, inputs):
    path = tmp_path / "t.json"
    path.write_text(shapes)
    output = _one_line_exit_2("plan", inputs["rules"], "-s", inputs["source"], "-t", path)
    assert "CKM540" in output


@pytest.mark.parametrize("size", ["9" * 400 + "GB", "0.1"], ids=["absurd", "under a byte"])
def test_a_shard_size_no_file_can_have_is_one_line(inputs, tmp_path, size):
    args = ["-s", inputs["source"], "-o", tmp_path / "o", "--max-shard-size", size]
    assert "CKM535" in _one_line_exit_2("apply", inputs["rules"], *args)


@pytest.mark.parametrize("bad", ["bad\x00name.safetensors", "n" * 5000 + ".safetensors"])
def test_odd_file_names_in_a_shard_index_are_one_line(tmp_path, bad):
    folder = write_hf_sharded(tmp_path / "hf", _pretrained(), shards=2)
    index = folder / "model.safetensors.index.json"
    doc = json.loads(index.read_text())
    doc["weight_map"]["0.weight"] = bad
    index.write_text(json.dumps(doc))
    _one_line_exit_2("inspect", folder)


def test_shipped_rules_on_zero_dimensional_tensors_are_plan_problems():
    for name in ("head-select-classes", "gpt2-conv1d-to-linear", "qkv-fuse"):
        rules = ckptmap.compile(Path(f"ckptmap:{name}"))
        keys = {
            t.pattern.text.replace("{i}", "0") for t in rules.ruleset.rules if hasattr(t, "pattern")
        }
        plan = rules.plan({k: [] for k in keys if "*" not in k})
        assert plan is not None  # no IndexError: problems are reported, not raised


def test_unstack_of_an_empty_dimension_is_a_plan_problem():
    plan = ckptmap.compile('split "w" -> "w.{e}" | unstack(0)').plan({"w": [0, 4]})
    assert plan is not None


def test_nested_and_sparse_tensors_in_a_pt_are_one_line(tmp_path):
    path = tmp_path / "odd.pt"
    torch.save(
        {
            "s": torch.eye(3).to_sparse(),
            "n": torch.nested.nested_tensor([torch.zeros(2), torch.zeros(3)]),
            "ok": torch.zeros(1),
        },
        path,
    )
    (tmp_path / "r.ckmap").write_text("")
    for command in (["inspect", path], ["plan", tmp_path / "r.ckmap", "-s", path]):
        result = runner.invoke(app, [str(a) for a in command])
        assert result.exception is None or isinstance(result.exception, SystemExit), result.output


@pytest.fixture
def full_disk(tmp_path):
    """A 64 KiB filesystem of its own (tmpfs; the tests run as root here and in CI)."""
    import subprocess

    mount = tmp_path / "small"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mount)], check=True)
    try:
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], check=False)


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_a_full_disk_says_so_and_leaves_nothing(tmp_path, full_disk, suffix):
    source = tmp_path / "big.safetensors"
    save_file({"w": torch.zeros(256, 1024)}, source)  # 1 MiB: more than the disk holds
    (tmp_path / "r.ckmap").write_text("")
    output = _one_line_exit_2(
        "apply", tmp_path / "r.ckmap", "-s", source, "-o", full_disk / f"o{suffix}"
    )
    assert "no space left on device" in output.lower(), output
    assert list(full_disk.iterdir()) == []


def test_a_header_over_the_limit_says_so(tmp_path):
    path = tmp_path / "big.safetensors"
    path.write_bytes((100 * 1024 * 1024 + 1).to_bytes(8, "little") + b"{}")
    output = _one_line_exit_2("inspect", path)
    assert "over the limit of 104,857,600" in output and "CKPTMAP_MAX_HEADER_BYTES" in output


def test_a_pt_file_with_torch_warnings_prints_one_line(tmp_path):
    path = tmp_path / "q.pt"
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        q = torch.quantize_per_tensor(torch.ones(2), 0.1, 0, torch.qint8)
    torch.save({"q": q}, path, pickle_protocol=4)
    result = runner.invoke(app, ["inspect", str(path)])
    assert result.exit_code in (0, 2) and "Warning" not in result.output, result.output
    if result.exit_code == 2:  # refused in one line: no torch warnings or advice before it
        assert len(result.output.strip().splitlines()) == 1, result.output


def test_split_into_zero_parts_is_a_compile_error():
    with pytest.raises(ckptmap.RuleCompileError, match="a number of equal parts above 0"):
        ckptmap.compile('split "a" -> "b", "c" | split(0, 0)')


def test_alias_checks_hold_under_python_O(tmp_path):
    import subprocess
    import sys

    path = _header_file(
        tmp_path / "a.safetensors",
        '{"__metadata__": {"ckptmap.aliases": "{\\"x\\": \\"__metadata__\\"}"}, "w": '
        + ENTRY.format(shape="[1]", size=4)
        + "}",
        bytes(4),
    )
    result = subprocess.run(
        [sys.executable, "-O", "-m", "ckptmap", "inspect", str(path)],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2 and "malformed ckptmap.aliases" in result.stderr, result.stderr


def test_a_transactional_load_keeps_ties_and_views(tmp_path):
    class Shared(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a = torch.nn.Linear(4, 4, bias=False)
            self.b = torch.nn.Linear(4, 4, bias=False)
            self.b.weight = self.a.weight  # one tied object
            self.c = torch.nn.Module()
            self.c.register_buffer("view", self.a.weight.data.view(16))  # a view of its storage

    model = Shared()
    w = torch.randn(4, 4)
    path = tmp_path / "w.safetensors"
    save_file({"a.weight": w, "c.view": w.reshape(16).clone()}, path)
    ckptmap.load_into(model, path, "")
    assert model.b.weight is model.a.weight and torch.equal(model.a.weight, w)
    assert model.c.view.data_ptr() == model.a.weight.data_ptr()  # still a view


# --- found by an adversarial pass over the fixes above -----------------------------------------


def _pt_with_pickle(tmp_path, edit) -> Path:
    """A torch zip whose data.pkl is edited by `edit(bytes) -> bytes` (the records kept)."""
    good = tmp_path / "good.pt"
    torch.save({"a": torch.arange(16.0), "b": torch.arange(2.0)}, good)
    bad = tmp_path / "bad.pt"
    with zipfile.ZipFile(good) as zin, zipfile.ZipFile(bad, "w") as zout:
        for info in zin.infolist():
            data = zin.read(info.filename)
            if info.filename.endswith("data.pkl"):
                data = edit(data)
            zout.writestr(info.filename, data)
    return bad


def test_a_storage_claimed_with_two_sizes_is_refused(tmp_path):
    # both tensors point at storage "1" (b's, 8 bytes): torch reads a's 64 bytes from it
    bad = _pt_with_pickle(
        tmp_path, lambda d: d.replace(b"X\x01\x00\x00\x000", b"X\x01\x00\x00\x001", 1)
    )
    with pytest.raises(ckptmap.CheckpointError, match="CKM525"):
        ckptmap.migrate(bad, "")


def test_a_zip_naming_a_record_twice_is_refused(tmp_path):
    good = tmp_path / "good.pt"
    torch.save({"a": torch.arange(16.0)}, good)
    bad = tmp_path / "twice.pt"
    with zipfile.ZipFile(good) as zin, zipfile.ZipFile(bad, "w") as zout:
        for info in zin.infolist():
            data = zin.read(info.filename)
            if info.filename.endswith("data/0"):
                import warnings

                with warnings.catch_warnings():  # zipfile says "Duplicate name" (once)
                    warnings.simplefilter("ignore")
                    zout.writestr(info.filename, data[:8])
            zout.writestr(info.filename, data)
    with pytest.raises(ckptmap.CheckpointError, match="twice"):
        ckptmap.migrate(bad, "")


@pytest.mark.parametrize(
    "header",
    [
        '{"w": {"dtype": "F32", "shape": [2], "data\\u005foffsets": [0, 8]}, '
        '"w": {"dtype": "F32", "shape": [2], "data_offsets": [8, 16]}}',
        '{"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16], "dtype": "I32"}}',
        '{"__metadata__": {}, "w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}, '
        '"__metadata__": {"ckptmap.aliases": "{\\"w2\\": \\"w\\"}"}}',
    ],
    ids=["escaped key", "field twice", "metadata twice"],
)
def test_every_duplicate_in_a_header_is_refused(tmp_path, header):
    path = _header_file(tmp_path / "d.safetensors", header, bytes(16))
    assert "twice" in _one_line_exit_2("inspect", path)


def test_a_failed_parallel_read_waits_for_every_piece(tmp_path, monkeypatch):
    import threading

    from ckptmap.io import safetensors as st

    path = tmp_path / "big.safetensors"
    save_file({"w": torch.zeros(4 << 20)}, path)  # 16 MiB: read in several pieces
    started, finished = [], []
    lock = threading.Lock()

    def read(self, view, start, end):
        with lock:
            started.append(start)
        if start == 0:
            raise ckptmap.CheckpointError("ended early", code="CKM510")
        time.sleep(0.3)
        with lock:
            finished.append(start)

    monkeypatch.setattr(st.RawBytes, "_read", read)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    raw = st.SafetensorsCheckpoint(path).raw("w")
    with pytest.raises(ckptmap.CheckpointError):
        raw.read_into(torch.empty(4 << 20))
    # every piece that started had ended (or never started) when the error came out
    assert sorted(finished) == sorted(s for s in started if s != 0)


def test_nested_repeats_are_refused_before_they_take_memory():
    start = time.perf_counter()
    with pytest.raises(ckptmap.RuleCompileError, match="copies of a piece"):
        ckptmap.compile('rename /(?:(?:(?:a{1000}){1000}){1000}){1000}/ -> "b"')
    assert time.perf_counter() - start < 2


def test_what_a_modules_own_code_changes_is_put_back_too():
    class Scaling(torch.nn.Linear):
        def __init__(self):
            super().__init__(8, 8)
            self.register_buffer("inverse", torch.ones(8), persistent=False)

        def _load_from_state_dict(self, state_dict, prefix, *args):
            super()._load_from_state_dict(state_dict, prefix, *args)
            self.inverse.mul_(2.0)  # not in the plan, written all the same

    model = torch.nn.Sequential(Scaling(), torch.nn.Linear(8, 8))
    before = _snapshot(model)
    inverse = model[0].inverse.clone()
    _raise_in_load(model[1])
    with pytest.raises(ckptmap.LoadError):
        ckptmap.load_into(
            model, {k: torch.randn_like(v) for k, v in model.state_dict().items()}, ""
        )
    assert _same(model, before) and torch.equal(model[0].inverse, inverse)


def test_a_model_on_the_meta_device_is_refused():
    with torch.device("meta"):
        model = torch.nn.Linear(2, 2)
    with pytest.raises(ckptmap.LoadError, match="meta device"):
        ckptmap.load_into(model, {"weight": torch.ones(2, 2), "bias": torch.ones(2)}, "")


def test_permuting_a_models_own_state_dict():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 4))
    w0, w1 = model[0].weight.clone(), model[1].weight.clone()
    rules = 'rename "0" -> "x"\nrename "1" -> "0"\nrename "x" -> "1"'
    ckptmap.load_into(model, model.state_dict(), rules)
    assert torch.equal(model[0].weight, w1) and torch.equal(model[1].weight, w0)


def test_text_files_over_the_limit_are_refused_and_long_lines_cut(tmp_path, monkeypatch):
    monkeypatch.setenv("CKPTMAP_MAX_TEXT_BYTES", "1000")
    big = tmp_path / "big.ckmap"
    big.write_text("# " + "x" * 2000 + "\n")
    assert "CKPTMAP_MAX_TEXT_BYTES" in _one_line_exit_2("check", big)
    monkeypatch.delenv("CKPTMAP_MAX_TEXT_BYTES")
    long = tmp_path / "long.ckmap"
    long.write_text('rename "' + "a" * 100000 + '" "b"\n')
    output = _one_line_exit_2("check", long)
    assert len(output) < 2000, len(output)


@pytest.mark.parametrize(
    "text",
    [
        "rules:\n  - transform: {from: a, ops: [{pad: [0, 0, " + "9" * 5000 + "]}]}\n",
        "rules: !!set {a, b}\n",
    ],
    ids=["5000 digits", "a set"],
)
def test_odd_yaml_values_are_one_line(tmp_path, text):
    path = tmp_path / "r.yaml"
    path.write_text(text)
    assert "CKM110" in _one_line_exit_2("check", path)


def test_a_header_version_of_5000_digits_is_one_line(tmp_path):
    path = tmp_path / "r.ckmap"
    path.write_text("ckptmap " + "9" * 5000 + "\n")
    assert "CKM106" in _one_line_exit_2("check", path)


def test_clean_up_never_touches_a_source_named_like_a_partial(tmp_path, inputs):
    import shutil

    # named as a killed write's leftovers would be (a dead pid), but it is what is read
    for name in ("3999999-keep", "3999998-abcdefgh"):
        src = tmp_path / f".o7.safetensors.ckptmap-partial-{name}"
        shutil.copy(inputs["source"], src)
        out = tmp_path / "o7.safetensors"
        _run("apply", inputs["rules"], "-s", src, "-o", out, "--overwrite", status=0)
        assert src.exists()
        src.unlink()
    (tmp_path / ".o9.safetensors.ckptmap-partial-1-abcdefgh").write_text("not ours to glob")
    _run(
        "apply",
        inputs["rules"],
        "-s",
        inputs["source"],
        "-o",
        tmp_path / "[o]9.safetensors",
        status=0,
    )
    assert (tmp_path / ".o9.safetensors.ckptmap-partial-1-abcdefgh").exists()


def test_a_warning_made_an_error_stops_the_load_before_it_starts():
    import warnings

    model = _model()
    before = _snapshot(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(UserWarning):
            ckptmap.load_into(model, _pretrained(), 'on unused warn\nfreeze "**"\nskip "nothing"')
    assert _same(model, before)


def test_a_post_hook_that_reports_missing_keys_fails_the_load():
    model = _model()
    before = _snapshot(model)
    _layer(model, "middle").register_load_state_dict_post_hook(
        lambda module, keys: keys.missing_keys.append("something")
    )
    with pytest.raises(ckptmap.LoadError, match="a load hook says something is missing"):
        ckptmap.load_into(model, _pretrained(), "")
    assert _same(model, before)


def test_a_factory_that_exits_is_one_line(tmp_path, inputs, monkeypatch):
    (tmp_path / "exiting.py").write_text("import sys\ndef build():\n    sys.exit(3)\n")
    monkeypatch.chdir(tmp_path)
    output = _one_line_exit_2(
        "plan", inputs["rules"], "-s", inputs["source"], "-t", "exiting:build"
    )
    assert "the factory failed (SystemExit" in output


def test_fmt_writes_through_a_link_and_keeps_the_mode(tmp_path):
    real = tmp_path / "real.ckmap"
    real.write_text('strip   "module."\n')
    real.chmod(0o600)
    link = tmp_path / "link.ckmap"
    link.symlink_to(real)
    _run("fmt", link, status=0)
    assert link.is_symlink() and real.read_text().endswith('strip "module."\n')
    assert real.stat().st_mode & 0o777 == 0o600


@pytest.mark.parametrize(
    "header, meta",
    [
        # written in another order, or with a field more: read as safetensors reads it
        (
            '{"w": {"shape": [2], "data_offsets": [0, 8], "dtype": "F32"}}',
            {"w": ((2,), "float32")},
        ),
        (
            '{"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8], "x": 1}}',
            {"w": ((2,), "float32")},
        ),
        # metadata whose keys are an entry's three: still metadata
        (
            '{"__metadata__": {"dtype": "a", "shape": "b", "data_offsets": "c"}, '
            '"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}',
            {"w": ((2,), "float32")},
        ),
        # three tensors named like an entry's fields: still three tensors
        (
            '{"dtype": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}, '
            '"shape": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}, '
            '"data_offsets": {"dtype": "F32", "shape": [0], "data_offsets": [8, 8]}}',
            {
                "dtype": ((1,), "float32"),
                "shape": ((1,), "float32"),
                "data_offsets": ((0,), "float32"),
            },
        ),
    ],
)
def test_header_entries_are_read_whatever_their_form(tmp_path, header, meta):
    """The header keeps entries as compact tuples when written as safetensors writes them;
    every other form reads the same."""
    from ckptmap.io import open_checkpoint

    path = _header_file(tmp_path / "h.safetensors", header, b"\0" * 8)
    ckpt = open_checkpoint(path)
    assert {k: tuple(v) for k, v in ckpt.meta().items()} == meta
    assert ckpt.metadata == json.loads(header).get("__metadata__", {})
    for name in meta:
        assert ckpt.raw(name).length == 4 * (meta[name][0] or (0,))[0]
