"""Every docs page's examples run: rule blocks parse, files are written, Python runs.

Fences:  ```ckmap             parsed and compiled
         ```ckmap file=NAME   written to NAME (in a temp folder), then parsed and compiled
         ```yaml file=NAME    written to NAME
         ```python            run in order, in one namespace per page, in the temp folder
         ```console           `$ ckptmap …` lines run in the temp folder; the lines after each
                              are its exact output, and `[exit N]` its exit status;
                              `$ torchrun …` runs processes for real (its stdout compared),
                              under `--slow` only
"""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

import ckptmap
from ckptmap.cli import app

DOCS = Path(__file__).resolve().parents[1] / "docs"
FENCE = re.compile(r"^```(\w+)([^\n]*)\n(.*?)^```", re.S | re.M)


def blocks(page: Path):
    for m in FENCE.finditer(page.read_text()):
        lang, info, body = m.group(1), m.group(2), m.group(3)
        file = re.search(r"file=(\S+)", info)
        line = page.read_text()[: m.start()].count("\n") + 2
        yield lang, file.group(1) if file else None, body, line


@pytest.mark.parametrize("page", sorted(DOCS.glob("*.md")), ids=lambda p: p.name)
def test_page_examples_run(page, tmp_path, monkeypatch, request):
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": f"docs_{page.stem}"}
    ran = 0
    for lang, file, body, line in blocks(page):
        if file:
            Path(file).write_text(body)
        if lang == "ckmap":
            where = Path(file) if file else None
            ckptmap.compile(where if where else ckptmap.parse(body, f"{page.name}:{line}"))
            ran += 1
        elif lang == "console":
            run_console(body, page.name, line, request.config.getoption("--slow"))
            ran += 1
        elif lang == "python":
            code = compile("\n" * (line - 1) + body, str(page), "exec")
            exec(code, namespace)
            ran += 1
    # a page either runs examples or says why it has none
    assert ran or "<!-- no runnable examples:" in page.read_text(), f"{page.name} runs nothing"


def run_console(body: str, page: str, line: int, slow: bool = False) -> None:
    runner = CliRunner(env={"COLUMNS": "100"})
    sessions: list[tuple[str, list[str]]] = []
    for text in body.splitlines():
        if text.startswith("$ "):
            sessions.append((text[2:], []))
        elif sessions:
            sessions[-1][1].append(text)
    assert sessions, f"{page}:{line}: a console block without a $ command"
    for command, expected in sessions:
        args = shlex.split(command)
        assert args[0] in ("ckptmap", "torchrun"), f"{page}:{line}: only ckptmap and torchrun run"
        status = 0
        if expected and expected[-1].startswith("[exit "):
            status = int(expected.pop()[6:-1])
        if args[0] == "torchrun":
            if slow:  # processes that start torch each: seconds, so with the slow tests
                run_launched(args, expected, status, f"{page}:{line}")
            continue
        result = runner.invoke(app, args[1:])
        got = [ln.rstrip() for ln in result.output.rstrip("\n").splitlines()]
        assert got == [ln.rstrip() for ln in expected], f"{page}:{line}: $ {command}"
        assert result.exit_code == status, f"{page}:{line}: $ {command}\n{result.output}"


def run_launched(args: list[str], expected: list[str], status: int, where: str) -> None:
    """`torchrun …` as processes: its stdout (what rank 0 prints) is the block's output."""
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", *args[1:]],
        capture_output=True,
        text=True,
        timeout=300,
    )
    got = [ln.rstrip() for ln in proc.stdout.rstrip("\n").splitlines()]
    assert got == [ln.rstrip() for ln in expected], f"{where}: {proc.stderr[-2000:]}"
    assert proc.returncode == status, f"{where}: {proc.stderr[-2000:]}"
