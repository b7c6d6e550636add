"""A command starts at once: `import ckptmap` and the CLI's help import no rule models, no
grammar, no torch; the grammar's parser tables are built once per user and then loaded."""

from __future__ import annotations

import subprocess
import sys

import pytest

import ckptmap
from ckptmap import syntax


def loaded_after(code: str) -> set[str]:
    probe = f"{code}\nimport sys; print(' '.join(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    return set(out.stdout.split())


def test_import_and_help_load_nothing_heavy():
    heavy = {"torch", "pydantic", "lark", "yaml", "safetensors", "numpy"}
    assert not heavy & loaded_after("import ckptmap")
    assert not heavy & loaded_after("import ckptmap.cli")
    help_run = "import sys; sys.argv = ['ckptmap', '--help']\nfrom ckptmap.cli import main\n"
    help_run += "try:\n    main()\nexcept SystemExit:\n    pass"
    assert not heavy & loaded_after(help_run)


def test_every_public_name_is_there_when_asked_for():
    for name in ckptmap.__all__:
        assert getattr(ckptmap, name) is not None, name
    assert set(ckptmap.__all__) <= set(dir(ckptmap))
    with pytest.raises(AttributeError, match="no attribute 'nothing'"):
        ckptmap.nothing  # noqa: B018


def test_the_parser_tables_are_kept_and_rebuilt_when_they_must_be(tmp_path, monkeypatch):
    monkeypatch.setenv("CKPTMAP_CACHE", str(tmp_path / "cache"))
    text = 'strip "module."\nrename "a.{i}" -> "b.{i}"\n'
    syntax._parser.cache_clear()
    try:
        built = ckptmap.parse(text)
        kept = list((tmp_path / "cache").glob("grammar-*.lark"))
        assert len(kept) == 1 and (tmp_path / "cache").stat().st_mode & 0o777 == 0o700
        syntax._parser.cache_clear()
        assert ckptmap.parse(text) == built  # loaded from the file: the same rules, spans
        kept[0].write_bytes(kept[0].read_bytes()[:50])  # cut short: built again, and kept
        syntax._parser.cache_clear()
        assert ckptmap.parse(text) == built
        assert kept[0].stat().st_size > 50
        # a folder others can write is not trusted: the tables are built, nothing loaded
        (tmp_path / "cache").chmod(0o777)
        kept[0].write_bytes(b"not a parser")
        syntax._parser.cache_clear()
        assert ckptmap.parse(text) == built
        assert kept[0].read_bytes() == b"not a parser"
    finally:
        syntax._parser.cache_clear()


def test_functions_named_like_their_modules_stay_functions():
    import importlib

    importlib.import_module("ckptmap.compile")
    importlib.import_module("ckptmap.suggest")
    assert callable(ckptmap.compile) and ckptmap.compile.__name__ == "compile"
    assert callable(ckptmap.suggest) and ckptmap.suggest.__name__ == "suggest"


def test_a_plan_reads_no_tensor(tmp_path, monkeypatch):
    """Planning is names, shapes and dtypes: a 4 GiB checkpoint whose data was never
    written (a sparse file) plans, and no reader is asked for a tensor or its bytes."""
    import json

    from ckptmap.io import safetensors as st

    n, rows = 1000, 1000
    header = {
        f"model.layers.{i}.w": {
            "dtype": "F32",
            "shape": [rows, 1024],
            "data_offsets": [i * rows * 4096, (i + 1) * rows * 4096],
        }
        for i in range(n)
    }
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    path = tmp_path / "big.safetensors"
    with open(path, "wb") as f:
        f.write(len(text).to_bytes(8, "little") + text)
        f.truncate(8 + len(text) + n * rows * 4096)  # 4 GiB of holes

    def refuse(self, name):
        raise AssertionError(f"planning read {name}")

    monkeypatch.setattr(st.SafetensorsCheckpoint, "get", refuse)
    monkeypatch.setattr(st.SafetensorsCheckpoint, "raw", refuse)
    plan = ckptmap.compile('rename "model.layers" -> "blocks"').plan(path)
    assert plan.ok and len(plan.sources) == n
    assert plan.outputs[0].target.startswith("blocks.")
