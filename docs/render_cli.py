"""Regenerate docs/cli.md from docs/cli.md.in: each `@@args` line becomes a console block
holding the real output of `ckptmap args`, run in a fresh folder after the page's own
file blocks are written and its Python blocks run. tests/test_docs.py checks the result.

    python docs/render_cli.py
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
FENCE = re.compile(r"^```(\w+)([^\n]*)\n(.*?)^```", re.S | re.M)


def main() -> None:
    template = (HERE / "cli.md.in").read_text()
    env = dict(os.environ, COLUMNS="100")
    with tempfile.TemporaryDirectory() as tmp:
        for m in FENCE.finditer(template):
            file = re.search(r"file=(\S+)", m.group(2))
            if file:
                Path(tmp, file.group(1)).write_text(m.group(3))
            if m.group(1) == "python":
                subprocess.run([sys.executable, "-c", m.group(3)], cwd=tmp, check=True)

        def run(m: re.Match) -> str:
            args = m.group(1).split()
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

        (HERE / "cli.md").write_text(re.sub(r"^@@(.*)$", run, template, flags=re.M))


if __name__ == "__main__":
    main()
