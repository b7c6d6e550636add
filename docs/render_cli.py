"""Regenerate docs/PAGE.md from each docs/PAGE.md.in (cli, troubleshooting): each `@@args`
line becomes a console block holding the real output of `ckptmap args`, run in a fresh
folder where the page's file blocks before it are written and its Python blocks before it
have run. tests/test_docs.py checks the result.

    python docs/render_cli.py
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
FENCE = re.compile(r"^```(\w+)([^\n]*)\n(.*?)^```", re.S | re.M)


ERROR_TABLE = re.compile(r"(<!-- error-table:[^\n]*-->\n).*?(<!-- /error-table -->)", re.S)


def main() -> None:
    for page in sorted(HERE.glob("*.md.in")):
        render(page)
    sys.path.insert(0, str(HERE.parent / "src"))
    from ckptmap.errors import error_table

    language = HERE / "language.md"
    text = language.read_text()
    language.write_text(ERROR_TABLE.sub(lambda m: m[1] + error_table() + m[2], text))

    sys.path.insert(0, str(HERE.parent / "tests"))
    from test_architecture import graph_lines

    architecture = HERE / "architecture.md"
    text = architecture.read_text()
    graph = "\n".join(graph_lines()) + "\n"
    architecture.write_text(
        re.sub(r"(```text import-graph\n).*?(```)", lambda m: m[1] + graph + m[2], text, flags=re.S)
    )


def render(page: Path) -> None:
    template = page.read_text()
    env = dict(os.environ, COLUMNS="100")
    with tempfile.TemporaryDirectory() as tmp:

        def block(m: re.Match) -> None:
            file = re.search(r"file=(\S+)", m.group(2))
            if file:
                Path(tmp, file.group(1)).write_text(m.group(3))
            if m.group(1) == "python":
                subprocess.run([sys.executable, "-c", m.group(3)], cwd=tmp, check=True)

        def run(m: re.Match) -> str:
            args = shlex.split(m.group(1))
            r = subprocess.run(
                [sys.executable, "-m", "ckptmap.cli", *args],
                cwd=tmp,
                env=env,
                capture_output=True,
                text=True,
            )
            lines = [ln.rstrip() for ln in (r.stdout + r.stderr).rstrip("\n").splitlines()]
            status = [f"[exit {r.returncode}]"] if r.returncode else []
            return "\n".join(["```console", f"$ ckptmap {m.group(1)}", *lines, *status, "```"])

        # blocks and commands in page order, as tests/test_docs.py runs them
        pieces, at = [], 0
        for m in re.finditer(FENCE.pattern + r"|^@@([^\n]*)$", template, flags=re.S | re.M):
            pieces.append(template[at : m.start()])
            if m.group(4) is not None:
                pieces.append(run(re.match(r"@@(.*)", m.group(0))))
            else:
                block(m)
                pieces.append(m.group(0))
            at = m.end()
        pieces.append(template[at:])
        page.with_suffix("").write_text("".join(pieces))


if __name__ == "__main__":
    main()
