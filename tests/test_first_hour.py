"""The first hour as a user meets it: no silent outcome, no message that points the wrong way.

One test (or a few) per defect found by trying ckptmap as a new user would; each failed
before the fix.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from models import GPT2LMHead, ResNet
from safetensors import safe_open
from safetensors.torch import load_file, save_file, save_model
from typer.testing import CliRunner

import ckptmap
from ckptmap.cli import app
from ckptmap.plan import Plan

runner = CliRunner(env={"COLUMNS": "200"})


def _run(*args: str, status: int | None = None) -> str:
    result = runner.invoke(app, [str(a) for a in args])
    if status is not None:
        assert result.exit_code == status, result.output
    return result.output


@pytest.fixture
def head_checkpoint(tmp_path) -> Path:
    torch.manual_seed(0)
    sd = {
        "module.features.0.weight": torch.randn(4, 3),
        "module.head.weight": torch.randn(10, 4),
        "module.head.bias": torch.randn(10),
    }
    path = tmp_path / "src.safetensors"
    save_file(sd, path)
    return path


# --- 1. unused rules ---------------------------------------------------------------------------


def test_a_typo_stops_plan_and_apply_without_a_target(tmp_path, head_checkpoint):
    rules = tmp_path / "r.ckmap"
    rules.write_text('strip "module."\nrename "featurs" -> "backbone"\n')
    output = _run("plan", rules, "-s", head_checkpoint, status=1)
    assert (
        'unused rule: rename "featurs" -> "backbone" (' in output
        and "did you mean 'features' (as in features.0.weight)?" in output
    )
    out = tmp_path / "out.safetensors"
    _run("apply", rules, "-s", head_checkpoint, "-o", out, status=1)
    assert not out.exists()  # no unchanged copy written


def test_strict_overrides_a_files_on_unused_warn(tmp_path, head_checkpoint):
    rules = tmp_path / "r.ckmap"
    rules.write_text('on unused warn\nstrip "module."\nskip "optimizer"\n')
    assert "has problems" not in _run("plan", rules, "-s", head_checkpoint, status=0)
    _run("plan", rules, "-s", head_checkpoint, "--strict", status=1)


def test_shared_wrapper_rules_pass_on_a_clean_checkpoint():
    sd = ResNet(10).state_dict()
    for name in ("wrappers", "ddp", "torch-compile"):
        plan = ckptmap.compile(Path(f"ckptmap:{name}")).plan(sd, sd)
        assert plan.ok and len(plan.unused_rules) == 1, str(plan)


def test_load_into_takes_on_unused(head_checkpoint):
    model = torch.nn.Linear(2, 2)
    sd = model.state_dict()
    with pytest.raises(ckptmap.PlanError, match="CKM310"):
        ckptmap.load_into(model, sd, 'skip "optimizer"')
    report = ckptmap.load_into(model, sd, 'skip "optimizer"', on_unused="ignore")
    assert [r.text for r in report.unused_rules] == ['skip "optimizer"']


def test_optional_round_trips_through_text_and_yaml():
    rules = ckptmap.parse('optional strip "module."\noptional init "fc"\non unused warn\n')
    assert ckptmap.parse(rules.to_text()) == rules
    yaml_text = rules.to_yaml()
    assert "optional: true" in yaml_text and "on_unused: warn" in yaml_text
    from ckptmap.syntax import parse_yaml

    assert parse_yaml(yaml_text) == rules
    with pytest.raises(ckptmap.RuleSyntaxError, match="cannot be optional"):
        ckptmap.rules.Prefix("x.", optional=True)


# --- 2. a broken pipe --------------------------------------------------------------------------


def test_a_closed_pipe_ends_the_command_as_sigpipe_not_exit_1(tmp_path):
    # names without numbers do not fold: a listing far longer than a pipe's buffer
    names = [f"layer_{a}{b}{c}.weight" for a in "abcdefghij" for b in "abcdefghij" for c in "abcd"]
    source = tmp_path / "many.safetensors"
    save_file({n: torch.zeros(1) for n in names}, source)
    rules = tmp_path / "r.ckmap"
    rules.write_text('prefix "model."\n')
    proc = subprocess.Popen(
        [sys.executable, "-m", "ckptmap", "plan", str(rules), "-s", str(source)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    proc.stdout.read(100)  # the reader takes the first line or so, then goes away
    proc.stdout.close()
    stderr = proc.stderr.read().decode()
    proc.wait(timeout=120)
    assert proc.returncode in (0, -signal.SIGPIPE), (proc.returncode, stderr)
    assert "Traceback" not in stderr and "BrokenPipe" not in stderr


# --- 3. listings never contradict their problems -----------------------------------------------


def test_a_failing_op_or_split_is_never_listed_as_loaded(tmp_path, head_checkpoint):
    rules = tmp_path / "r.ckmap"
    rules.write_text(
        'strip "module."\n'
        'split "head.weight" -> "a", "b" | split([5, 4], 0)\n'
        'transform "features.0.weight" | transpose(0, 2)\n'
    )
    output = _run("plan", rules, "-s", head_checkpoint, status=1)
    assert "3 source tensors: 2 failed, 1 loaded" in output
    assert "failed (op) via split" in output and "failed (op) via transform" in output
    assert "(no rule matched)" not in output
    plan = ckptmap.compile(rules).plan(head_checkpoint)
    assert plan.mapping == {"module.head.bias": "head.bias"}
    report = plan.report()
    assert {e.source: e.reason for e in report.failed} == {
        "module.features.0.weight": "op",
        "module.head.weight": "op",
    }
    assert report.accounts_for(plan.mapping.keys() | {e.source for e in report.failed})


def test_a_conflict_fails_both_sources_and_is_not_also_missing():
    plan = ckptmap.compile('rename "a" -> "c"\nrename "b" -> "c"').plan(
        {"a.w": [1], "b.w": [1]}, {"c.w": [1]}
    )
    assert [p.code for p in plan.errors] == ["CKM301"]
    assert {e.source: (e.status, e.reason) for e in plan.sources} == {
        "a.w": ("failed", "conflict"),
        "b.w": ("failed", "conflict"),
    }
    assert plan.targets[0].status == "missing" and plan.targets[0].reason == "failed"


# --- 4. `*` in a rename target -----------------------------------------------------------------


def test_a_star_in_a_rename_target_is_refused_with_the_fix():
    with pytest.raises(ckptmap.RuleCompileError) as info:
        ckptmap.compile('rename "blocks.*.attn" -> "layers.*.attn"')
    e = info.value
    assert e.code == "CKM212" and e.span.column == 35
    assert e.hint == 'write: rename "blocks.{i}.attn" -> "layers.{i}.attn"'
    with pytest.raises(ckptmap.RuleCompileError, match="CKM212"):
        ckptmap.compile('merge "a.*.q", "a.*.k" -> "a.*.qk" | cat(0)')


# --- 5. one overwrite rule for every writer ----------------------------------------------------


def test_existing_outputs_are_refused_unless_overwrite(tmp_path, head_checkpoint):
    rules = tmp_path / "r.ckmap"
    rules.write_text('strip "module."\n')
    out = tmp_path / "out.safetensors"
    out.write_bytes(b"keep me")
    output = _run("apply", rules, "-s", head_checkpoint, "-o", out, status=2)
    assert "already exists; pass --overwrite" in output and out.read_bytes() == b"keep me"
    report = tmp_path / "report.json"
    report.write_text("keep me")
    out2 = tmp_path / "out2.safetensors"
    _run("apply", rules, "-s", head_checkpoint, "-o", out2, "--report", report, status=2)
    assert report.read_text() == "keep me" and not out2.exists()
    _run("apply", rules, "-s", head_checkpoint, "-o", out, "--report", report, "--overwrite",
         status=0)  # fmt: skip
    assert set(load_file(out)) == {"features.0.weight", "head.weight", "head.bias"}
    assert json.loads(report.read_text())["loaded"]


def test_a_sharded_folder_is_replaced_only_with_overwrite(tmp_path, head_checkpoint):
    rules = tmp_path / "r.ckmap"
    rules.write_text('strip "module."\n')
    folder = tmp_path / "sharded"
    args = ["apply", rules, "-s", head_checkpoint, "-o", folder, "--max-shard-size", "100B"]
    _run(*args, status=0)
    first = sorted(p.name for p in folder.iterdir())
    assert "already exists; pass --overwrite" in _run(*args, status=2)
    _run(*args, "--overwrite", status=0)
    assert sorted(p.name for p in folder.iterdir()) == first
    (folder / "notes.txt").write_text("mine")  # not only a checkpoint: never deleted
    assert "holds more than a sharded checkpoint" in _run(*args, "--overwrite", status=2)
    assert (folder / "notes.txt").read_text() == "mine"


# --- 6. a mismatch after a transform names the file's shape, the ops and the rule ---------------


def test_mismatch_after_an_op_says_source_shape_ops_result_and_rule(tmp_path, head_checkpoint):
    rules = tmp_path / "r.ckmap"
    rules.write_text(
        'strip "module."\nrename "head" -> "classifier"\n'
        'transform "classifier.bias" | pad(0, 0, 3)\n'
    )
    target = tmp_path / "t.json"
    target.write_text(
        json.dumps(
            {"features.0.weight": [4, 3], "classifier.bias": [12], "classifier.weight": [10, 4]}
        )
    )
    output = _run("plan", rules, "-s", head_checkpoint, "-t", target, status=1)
    assert (
        "shape mismatch: module.head.bias [10] | pad(0, 0, 3) gives [13] for classifier.bias, "
        'which expects [12] (via transform "classifier.bias" | pad(0, 0, 3) (' in output
    )
    assert "module.head.bias -> classifier.bias  [10] -> [13]" in output


def test_listings_show_shapes_before_and_after_an_op():
    plan = ckptmap.compile('transform "c_attn.weight" | transpose(0, 1)').plan(
        {"c_attn.weight": [64, 192]}
    )
    assert "c_attn.weight  [64, 192] -> [192, 64]  loaded" in str(plan)
    merged = ckptmap.compile('merge "q", "k" -> "qk" | cat(0)').plan({"q": [8, 4], "k": [2, 4]})
    assert "q + k -> qk  [8, 4] + [2, 4] -> [10, 4]" in str(merged)


# --- 7. reverse into a file saved by safetensors' save_model (tied weights) ---------------------


def test_reverse_recognizes_save_models_dropped_tied_names(tmp_path):
    torch.manual_seed(0)
    original = tmp_path / "gpt2.safetensors"
    save_file(
        {k: v for k, v in GPT2LMHead().state_dict().items() if k != "lm_head.weight"}, original
    )
    tuned = GPT2LMHead()
    finetuned = tmp_path / "tuned.safetensors"
    save_model(
        tuned, finetuned
    )  # keeps lm_head.weight, records transformer.wte.weight as its alias
    with safe_open(finetuned, "pt") as f:
        assert "transformer.wte.weight" not in f.keys()  # noqa: SIM118
    rules = tmp_path / "none.ckmap"
    rules.write_text("")
    back = tmp_path / "back.safetensors"
    _run("apply", rules, "--reverse", "--original", original, "-s", finetuned, "-o", back,
         status=0)  # fmt: skip
    assert torch.equal(load_file(back)["transformer.wte.weight"], tuned.transformer.wte.weight)


# --- 8. every public entry point raises CkptmapError -------------------------------------------


@pytest.mark.parametrize(
    "call",
    [
        lambda: ckptmap.load_into(torch.nn.Linear(2, 2), {}, "", on_missing="skip"),
        lambda: ckptmap.migrate({}, "", on_unexpected="maybe"),
        lambda: ckptmap.compile("").plan({}, on_mismatch="warn"),
        lambda: ckptmap.compile(42),
        lambda: ckptmap.parse(b"strip 'x'"),
        lambda: ckptmap.load_rules(None),
        lambda: ckptmap.compile("").plan(42),
        lambda: ckptmap.compile("").plan({"a": "not a shape"}),
        lambda: ckptmap.compile("").plan({1: [2]}),
        lambda: ckptmap.compile("").plan({"a": [1]}).apply(42),
        lambda: ckptmap.load_into({"not": "a module"}, {}, ""),
        lambda: ckptmap.rules.Strip(""),
        lambda: ckptmap.rules.Rename("a"),
        lambda: ckptmap.rules.Ruleset([42]),
        lambda: ckptmap.rules.Policy("missing", "skip"),
        lambda: ckptmap.rules.Transform("a", [ckptmap.rules.OpCall("transpose", [True])]),
        lambda: Plan.from_json("{}"),
    ],
)
def test_public_entry_points_raise_only_ckptmap_errors(call):
    with pytest.raises(ckptmap.CkptmapError) as info:
        call()
    assert str(info.value)  # renders


def test_a_bad_policy_word_names_the_choices():
    with pytest.raises(ckptmap.UsageError) as info:
        ckptmap.load_into(torch.nn.Linear(2, 2), {}, "", on_missing="skip")
    assert "on_missing='skip': on_missing takes 'error', 'warn', 'ignore'" in str(info.value)
    assert isinstance(info.value, ValueError)  # as Python's own would be


# --- 9. a file name given as str ---------------------------------------------------------------


def test_a_rule_file_name_given_as_str_says_pass_a_path():
    with pytest.raises(ckptmap.RuleSyntaxError) as info:
        ckptmap.load_into(torch.nn.Linear(2, 2), {}, "v1_to_v2.ckmap")
    assert info.value.code == "CKM114"
    assert info.value.hint == "pass a pathlib.Path to read a file: Path('v1_to_v2.ckmap')"


# --- 10. a factory in the working folder -------------------------------------------------------


def test_target_factory_in_the_working_folder(tmp_path, head_checkpoint, monkeypatch):
    (tmp_path / "my_first_models.py").write_text(
        "import torch\n"
        "def build():\n"
        "    m = torch.nn.Module()\n"
        "    m.features = torch.nn.ModuleList([torch.nn.Linear(3, 4, bias=False)])\n"
        "    m.head = torch.nn.Linear(4, 10)\n"
        "    return m\n"
    )
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    monkeypatch.delitem(sys.modules, "my_first_models", raising=False)
    rules = tmp_path / "r.ckmap"
    rules.write_text('strip "module."\n')
    _run("plan", rules, "-s", head_checkpoint, "-t", "my_first_models:build", status=0)


# --- 11. YAML ops written as strings -----------------------------------------------------------


def test_yaml_ops_as_text_get_the_yaml_spelling(tmp_path):
    rules = tmp_path / "r.yaml"
    rules.write_text('rules:\n  - transform: {from: "a.weight", ops: ["transpose(0, 1)"]}\n')
    with pytest.raises(ckptmap.RuleSyntaxError) as info:
        ckptmap.load_rules(rules)
    message = info.value.message
    assert "op 1 is the text 'transpose(0, 1)'" in message
    assert "write {transpose: [0, 1]}" in message and "Value error" not in message
    assert info.value.span.line == 2


# --- 12. a composed plan's groups --------------------------------------------------------------


def test_a_composed_plan_prints_each_group_once(tmp_path):
    one = tmp_path / "v1_to_v2.ckmap"
    one.write_text(
        'rename "blocks.{i}.attn" -> "layers.{i}.attn"\nrename "blocks.{i}.mlp" -> "layers.{i}.mlp"\n'
    )
    two = tmp_path / "v2_to_v3.ckmap"
    two.write_text('rename "layers" -> "encoder.layers"\n')
    sd = {f"blocks.{i}.{m}.w": torch.zeros(1) for i in range(3) for m in ("attn", "mlp")}
    source = tmp_path / "v1.safetensors"
    save_file(sd, source)
    output = _run("plan", one, two, "-s", source, status=0)
    assert output.count('loaded via rename "layers" -> "encoder.layers"') == 1
    assert "6 tensors" in output


# --- 13. diff --values -------------------------------------------------------------------------


def test_diff_values_reports_the_largest_differences_and_exits_1(tmp_path):
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    w = torch.ones(4, 4)
    save_file({"w": w, "same": torch.zeros(3), "nan": torch.tensor([float("nan")])}, a)
    save_file({"w": w + 0.01, "same": torch.zeros(3), "nan": torch.tensor([float("nan")])}, b)
    assert "3 tensors with the same name" in _run("diff", a, b, status=0)  # names only
    output = _run("diff", a, b, "--values", status=1)
    assert "w  16 values past tolerance, max abs 0.01, max rel 0.0099" in output
    assert "2 of them equal" in output  # NaN equals NaN
    assert "3 of them within atol=0.02" in _run(
        "diff", a, b, "--values", "--atol", "0.02", status=0
    )
    _run("diff", a, b, "--values", "--rtol", "0.02", status=0)


# --- 14. inspect shows metadata ----------------------------------------------------------------


def test_inspect_shows_provenance_and_json(tmp_path, head_checkpoint):
    rules = tmp_path / "r.ckmap"
    rules.write_text('strip "module."\n')
    out = tmp_path / "out.safetensors"
    _run("apply", rules, "-s", head_checkpoint, "-o", out, status=0)
    text = _run("inspect", out, status=0)
    assert "metadata:" in text and "ckptmap.plan_fingerprint: sha256:" in text
    assert 'ckptmap.source: [{"name": "src.safetensors", "bytes":' in text
    doc = json.loads(_run("inspect", out, "--json", status=0))
    assert doc["tensors"]["head.bias"] == {"shape": [10], "dtype": "float32"}
    assert doc["metadata"]["ckptmap.version"] == ckptmap.__version__


# --- 15. reverse from a saved plan -------------------------------------------------------------


def test_apply_reverse_from_a_saved_plan(tmp_path, head_checkpoint):
    rules = tmp_path / "r.ckmap"
    rules.write_text('strip "module."\ntransform "head.weight" | transpose(0, 1)\n')
    saved = tmp_path / "plan.json"
    saved.write_text(_run("plan", rules, "-s", head_checkpoint, "--json", status=0))
    mapped = tmp_path / "mapped.safetensors"
    _run("apply", rules, "-s", head_checkpoint, "-o", mapped, status=0)
    head_checkpoint.unlink()  # the original is gone
    back = tmp_path / "back.safetensors"
    _run("apply", "--reverse", "--plan", saved, "-s", mapped, "-o", back, status=0)
    restored, mapped_sd = load_file(back), load_file(mapped)
    assert torch.equal(restored["module.head.weight"], mapped_sd["head.weight"].T)
    assert Plan.from_json(saved.read_text()).fingerprint.startswith("sha256:")
    saved.write_text(saved.read_text().replace('"loaded"', '"skipped"', 1))
    assert "does not match its fingerprint" in _run(
        "apply", "--reverse", "--plan", saved, "-s", mapped, "-o", tmp_path / "x.safetensors",
        status=2,
    )  # fmt: skip


# --- 16. shipped rule files by name, demo --keep, unwrapped tables -----------------------------


def test_shipped_rule_files_by_name(tmp_path, head_checkpoint):
    listing = _run("rules", status=0)
    assert "ckptmap:wrappers" in listing and "[in, out]" in listing
    rules = tmp_path / "r.ckmap"
    rules.write_text('include "ckptmap:wrappers"\n')
    assert ckptmap.compile(rules).plan(head_checkpoint).mapping["module.head.bias"] == "head.bias"
    _run("plan", "ckptmap:ddp", "-s", head_checkpoint, status=0)
    with pytest.raises(ckptmap.RuleCompileError, match="no rule file of that name"):
        ckptmap.compile('include "ckptmap:wrapper"')


def test_demo_keep_leaves_its_files(tmp_path):
    keep = tmp_path / "demo"
    output = _run("demo", "--keep", keep, status=0)
    assert f"the demo's files are in {keep}" in output
    assert {"resnet-imagenet.pt", "resnet-5class.safetensors"} <= {p.name for p in keep.iterdir()}
    _run("demo", "--keep", keep, status=2)  # not into a folder that has files


def test_tables_do_not_wrap_key_names_off_a_terminal(tmp_path):
    long = "encoder." + "very_long_module_name." * 8 + "weight"
    path = tmp_path / "long.safetensors"
    save_file({long: torch.zeros(2)}, path)
    narrow = CliRunner(env={"COLUMNS": "60"})
    assert long in narrow.invoke(app, ["inspect", str(path)]).output


def test_a_reports_mismatch_shows_the_files_shape_and_the_ops_result():
    plan = ckptmap.compile('transform "head.bias" | pad(0, 0, 3)\non mismatch skip').plan(
        {"head.bias": [10]}, {"head.bias": [12]}
    )
    (m,) = plan.report().mismatched
    assert (m.file_shapes, m.source_shape, m.target_shape) == ([[10]], [13], [12])
    assert "  head.bias [10] -> [13] -> head.bias [12]" in str(plan.report())


def test_the_targets_of_a_failed_merge_or_split_are_not_also_missing():
    merge = ckptmap.compile('merge "fc.weight", "fc.bias" -> "fc.both" | cat(0)').plan(
        {"fc.weight": [10, 8], "fc.bias": [10]}, {"fc.both": [20, 8]}
    )
    assert [p.code for p in merge.errors] == ["CKM306"]
    split = ckptmap.compile('split "w" -> "a", "b", "c" | split([2, 2], 0)').plan(
        {"w": [4, 1]}, {"a": [2, 1], "b": [2, 1], "c": [2, 1]}
    )
    assert [p.code for p in split.errors] == ["CKM309"]
    assert {t.target: t.reason for t in split.targets} == dict.fromkeys("abc", "failed")


def test_a_mismatch_names_the_rule_whose_op_made_the_shape():
    plan = ckptmap.compile(
        'transform "fc.bias" | pad(0, 0, 3)\nrename "fc" -> "head"\nrename "head" -> "out"'
    ).plan({"fc.bias": [10]}, {"out.bias": [12]})
    assert '(via transform "fc.bias" | pad(0, 0, 3) (<rules>:1:1))' in plan.errors[0].message


def test_an_unused_rule_whose_keys_earlier_rules_took_says_so_not_did_you_mean():
    plan = ckptmap.compile('rename "body" -> "backbone"\nrename "body" -> "trunk"').plan(
        {"body.w": [1]}
    )
    (problem,) = plan.errors
    assert "the source has keys it would match (such as body.w), but earlier rules" in (
        problem.message
    )
    assert "did you mean" not in problem.message
    skipped = ckptmap.compile('skip "fc"\nfreeze "fc"').plan({"fc.w": [1], "a": [1]})
    assert "did you mean 'fc'" not in skipped.errors[0].message


def test_the_star_hint_uses_free_capture_names():
    with pytest.raises(ckptmap.RuleCompileError) as info:
        ckptmap.compile('rename "blocks.{i}.*.w" -> "layers.{i}.*.w"')
    assert info.value.hint == 'write: rename "blocks.{i}.{j}.w" -> "layers.{i}.{j}.w"'
    ckptmap.compile(info.value.hint.removeprefix("write: "))  # the hint compiles


# --- found by an adversarial pass over the fixes above -----------------------------------------


def test_diff_values_infinities_nans_and_large_integers(tmp_path):
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    save_file({"f": torch.tensor([1.0, 2.0, 3.0]), "i": torch.tensor([2**62])}, a)
    save_file(
        {"f": torch.tensor([float("inf"), float("nan"), 3.0]), "i": torch.tensor([2**62 + 1])}, b
    )
    for x, y in ((a, b), (b, a)):
        output = _run("diff", x, y, "--values", status=1)
        assert "f  2 values past tolerance" in output and "i  1 value past tolerance" in output
    same = tmp_path / "same.safetensors"
    save_file({"f": torch.tensor([float("inf"), float("nan")]), "i": torch.tensor([7])}, same)
    _run("diff", same, same, "--values", status=0)
    for bad in ("nan", "-1", "inf"):
        assert "a tolerance is a number >= 0" in _run(
            "diff", a, b, "--values", "--atol", bad, status=2
        )


def test_apply_refuses_a_dtype_the_plan_did_not_see(tmp_path, head_checkpoint):
    rules = tmp_path / "r.ckmap"
    rules.write_text('strip "module."\n')
    saved = tmp_path / "plan.json"
    saved.write_text(_run("plan", rules, "-s", head_checkpoint, "--json", status=0))
    tuned = tmp_path / "tuned.safetensors"
    save_file({k: v.to(torch.bfloat16) for k, v in load_file(head_checkpoint).items()}, tuned)
    out = tmp_path / "out.safetensors"
    output = _run("apply", "--plan", saved, "-s", tuned, "-o", out, status=2)
    assert "the checkpoint has bfloat16, the plan float32" in output and not out.exists()


def test_apply_with_a_saved_plan_refuses_options_it_cannot_honour(tmp_path, head_checkpoint):
    rules = tmp_path / "r.ckmap"
    rules.write_text('strip "module."\n')
    saved = tmp_path / "plan.json"
    saved.write_text(_run("plan", rules, "-s", head_checkpoint, "--json", status=0))
    out = tmp_path / "out.safetensors"
    for extra in (["-t", saved], ["--strict"], ["--original", head_checkpoint]):
        output = _run("apply", "--plan", saved, "-s", head_checkpoint, "-o", out, *extra, status=2)
        assert "belongs to `ckptmap plan`" in output
    output = _run("apply", rules, "-s", head_checkpoint, "-o", out, "--allow-lossy", status=2)
    assert "--allow-lossy goes with --reverse" in output
    bigger = tmp_path / "bigger.safetensors"
    save_file({**load_file(head_checkpoint), "module.extra": torch.zeros(2)}, bigger)
    output = _run("apply", "--plan", saved, "-s", bigger, "-o", out, status=0)
    assert "note: left out, not in the saved plan: module.extra" in output


@pytest.mark.parametrize(
    ("spec", "said"),
    [
        ("broken_models:boom", "the factory failed (RuntimeError: no model today)"),
        ("broken_models:needs_arg", "the factory failed (TypeError"),
        ("broken_models:not_a_model", "returned a int, not an nn.Module"),
        ("broken_syntax:build", "cannot import the factory (SyntaxError"),
        (":build", "cannot import the factory"),
        ("nomod:ok", "nomod:ok: cannot import"),  # no emoji
        ("json:dumps", "the factory failed (TypeError"),
        ("torch.nn:Linear", "the factory failed (TypeError"),
    ],
)
def test_a_target_factory_that_fails_is_one_line_and_exit_2(
    tmp_path, head_checkpoint, monkeypatch, spec, said
):
    (tmp_path / "broken_models.py").write_text(
        "def boom():\n    raise RuntimeError('no model today')\n"
        "def needs_arg(n):\n    pass\n"
        "def not_a_model():\n    return 3\n"
    )
    (tmp_path / "broken_syntax.py").write_text("def build(:\n")
    monkeypatch.chdir(tmp_path)
    rules = tmp_path / "r.ckmap"
    rules.write_text('strip "module."\n')
    output = _run("plan", rules, "-s", head_checkpoint, "-t", spec, status=2)
    assert said in output and "Traceback" not in output


def test_plan_from_json_says_what_it_takes():
    with pytest.raises(ckptmap.UsageError, match="takes the JSON text, not a PosixPath"):
        Plan.from_json(Path("plan.json"))
    with pytest.raises(ckptmap.UsageError) as info:
        Plan.from_json("plan.json")
    assert info.value.hint == "Plan.from_json(Path('plan.json').read_text())"
    with pytest.raises(ckptmap.CheckpointError, match=r"not a ckptmap plan \(Invalid JSON"):
        Plan.from_json("{")


def test_yaml_ops_as_one_text_or_a_bare_name(tmp_path):
    from ckptmap.syntax import parse_yaml

    with pytest.raises(ckptmap.RuleSyntaxError, match=r"write \{transpose: \[0, 1\]\}"):
        parse_yaml('rules:\n  - transform: {from: a, ops: "transpose(0, 1)"}\n')
    with pytest.raises(ckptmap.RuleSyntaxError, match=r"write \{transpose: \[args\]\}"):
        parse_yaml("rules:\n  - transform: {from: a, ops: [transpose]}\n")


def test_a_ruleset_of_text_says_how_to_build_one():
    with pytest.raises(ckptmap.RuleSyntaxError) as info:
        ckptmap.rules.Ruleset(rules=['strip "x"'])
    assert "rules[0] is 'strip \"x\"', not a statement" in info.value.message
    assert "function-after" not in info.value.message


def test_warnings_are_listed_as_warnings(tmp_path, head_checkpoint):
    rules = tmp_path / "r.ckmap"
    rules.write_text('on unused warn\nstrip "module."\nskip "optimizer"\n')
    output = _run("plan", rules, "-s", head_checkpoint, status=0)
    assert "warnings:\n  unused rule: skip" in output and "problems:" not in output


def test_a_report_that_cannot_be_written_stops_apply_before_the_output(tmp_path, head_checkpoint):
    rules = tmp_path / "r.ckmap"
    rules.write_text('strip "module."\n')
    out = tmp_path / "out.safetensors"
    output = _run(
        "apply",
        rules,
        "-s",
        head_checkpoint,
        "-o",
        out,
        "--report",
        tmp_path / "no" / "r.json",
        status=2,
    )
    assert "does not exist" in output and not out.exists()
    (tmp_path / "adir").mkdir()
    report = tmp_path / "adir"
    args = ["apply", rules, "-s", head_checkpoint, "-o", out, "--report", report, "--overwrite"]
    assert "is a folder" in _run(*args, status=2) and not out.exists()


def test_apply_writes_everything_before_it_prints(tmp_path):
    names = [f"layer_{a}{b}{c}.weight" for a in "abcdefghij" for b in "abcdefghij" for c in "abcd"]
    source = tmp_path / "many.safetensors"
    save_file({n: torch.zeros(1) for n in names}, source)
    rules = tmp_path / "r.ckmap"
    rules.write_text('prefix "model."\n')
    out, report = tmp_path / "out.safetensors", tmp_path / "r.json"
    cmd = [sys.executable, "-m", "ckptmap", "apply", str(rules), "-s", str(source), "-o", str(out)]
    proc = subprocess.Popen(
        [*cmd, "--report", str(report)], stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    proc.stdout.close()  # the reader is gone before anything is printed
    proc.wait(timeout=120)
    assert proc.returncode in (0, -signal.SIGPIPE), proc.stderr.read()
    assert len(load_file(out)) == len(names) and json.loads(report.read_text())["loaded"]


def test_inspect_counts_complex_bytes_and_pads_no_lines(tmp_path):
    path = tmp_path / "c.pt"
    torch.save({"z": torch.zeros(4, dtype=torch.complex64)}, path)
    output = _run("inspect", path, status=0)
    assert "1 tensors, 4 values, 32 B" in output
    assert all(line == line.rstrip() for line in output.splitlines())
