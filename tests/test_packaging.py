"""The wheel ships the one grammar, and a normal (non-editable) install finds it."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow  # child processes: seconds each


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    if not (ROOT / "pyproject.toml").exists():
        pytest.skip("not a source checkout")
    out = tmp_path_factory.mktemp("dist")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(out), str(ROOT)],
        check=True,
    )
    (found,) = out.glob("ckptmap-*.whl")
    return found


def test_wheel_contains_the_grammar(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    assert "ckptmap/grammar/ckptmap.lark" in names
    shipped = zipfile.ZipFile(wheel).read("ckptmap/grammar/ckptmap.lark").decode()
    assert shipped == (ROOT / "grammar" / "ckptmap.lark").read_text()


def test_installed_wheel_parses_rules(wheel, tmp_path):
    target = tmp_path / "site"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--no-deps",
            "-q",
            "--target",
            str(target),
            str(wheel),
        ],
        check=True,
    )
    code = (
        "import sys; sys.path.insert(0, sys.argv[1]);"
        "import ckptmap, ckptmap.syntax as s;"
        "assert ckptmap.__file__.startswith(sys.argv[1]), ckptmap.__file__;"
        'r = ckptmap.parse(\'strip "module."\\ninit "fc"\');'
        "print(len(r.rules), s.grammar_text() == open(sys.argv[2]).read())"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, str(target), str(ROOT / "grammar" / "ckptmap.lark")],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        check=True,
    )
    assert out.stdout.split() == ["2", "True"]
