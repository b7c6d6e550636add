"""What ckptmap does without torch, run as a user would: `python tests/without_torch.py`
in an environment where `pip install ckptmap` left torch out (.ci/run makes one), or with
`--block` in any environment (torch made unimportable first).

Every command that never touches tensor data must work; those that need torch must say,
in one line, how to install it. Exits 1 on the first thing that does not hold.
"""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import tempfile
from pathlib import Path

BLOCK = "import sys; sys.modules['torch'] = None\n"  # `import torch` then fails, as if absent


def safetensors(path: Path, tensors: dict[str, tuple[str, list[int]]]) -> Path:
    """A safetensors file written by hand (no torch, no numpy): zeros of the given shapes."""
    sizes = {"F32": 4, "BF16": 2}
    header, offset = {}, 0
    for name, (dtype, shape) in tensors.items():
        n = sizes[dtype]
        for d in shape:
            n *= d
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + n]}
        offset += n
    blob = json.dumps(header).encode()
    blob += b" " * (-len(blob) % 8)
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + bytes(offset))
    return path


def main() -> int:
    block = "--block" in sys.argv
    work = Path(tempfile.mkdtemp(prefix="ckptmap-no-torch-"))
    os.chdir(work)
    src = safetensors(
        work / "src.safetensors",
        {
            "module.h.0.attn.weight": ("F32", [4, 4]),
            "module.h.1.attn.weight": ("F32", [4, 4]),
            "module.head.weight": ("BF16", [3, 4]),
        },
    )
    before = src.read_bytes()
    safetensors(work / "other.safetensors", {"h.0.attn.weight": ("F32", [4, 4])})
    (work / "rules.ckmap").write_text(
        'ckptmap 1\n\nstrip "module."\nrename "h.{i}" -> "blocks.{i}"\n'
    )
    (work / "transform.ckmap").write_text('transform "**.attn.weight" | transpose(0, 1)\n')
    (work / "messy.ckmap").write_text('strip   "module."\n')
    (work / "model.pt").write_bytes(b"PK\x03\x04 not really a torch file")
    ok_runs = [
        ["check", "rules.ckmap", "transform.ckmap"],
        ["fmt", "--check", "rules.ckmap"],
        ["schema"],
        ["inspect", "src.safetensors"],
        ["plan", "rules.ckmap", "-s", "src.safetensors"],
        ["plan", "rules.ckmap", "-s", "src.safetensors", "--html", "plan.html"],
        ["plan", "transform.ckmap", "-s", "src.safetensors"],  # planning an op: shapes only
        ["diff", "src.safetensors", "other.safetensors"],
        ["apply", "rules.ckmap", "-s", "src.safetensors", "-o", "out.safetensors"],
        ["inspect", "out.safetensors"],
        ["fmt", "messy.ckmap"],
    ]
    needs_torch = [
        ["apply", "transform.ckmap", "-s", "src.safetensors", "-o", "t.safetensors"],
        ["inspect", "model.pt"],
        ["demo"],
    ]
    failures = []
    prefix = BLOCK if block else ""
    for args in ok_runs + needs_torch:
        code = (
            prefix
            + f"import sys; sys.argv = ['ckptmap', *{args!r}]\nfrom ckptmap.cli import main\nmain()"
        )
        run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
        said = run.stdout + run.stderr
        if args in ok_runs:
            expected = 1 if args[:2] == ["diff", "src.safetensors"] else 0
            if run.returncode != expected or "Traceback" in said:
                failures.append(f"ckptmap {' '.join(args)}: exit {run.returncode}\n{said}")
        elif (
            run.returncode != 2
            or "Traceback" in said
            or "CKM003" not in said
            or "pip install 'ckptmap[torch]'" not in said
        ):
            failures.append(f"ckptmap {' '.join(args)}: no one-line install hint\n{said}")
    renamed = json.loads(Path("out.safetensors").read_bytes()[8:].split(b"}}", 1)[0] + b"}}")
    if "blocks.0.attn.weight" not in renamed:
        failures.append(f"the rename wrote {sorted(renamed)}")
    if src.read_bytes() != before:
        failures.append("the source changed")
    library = prefix + (  # the library says the same: a state_dict is made of tensors
        "import ckptmap\n"
        "try:\n    ckptmap.migrate('src.safetensors', 'strip \"module.\"')\n"
        "except ckptmap.CkptmapError as e:\n    print(e.code, e.hint)\n"
    )
    said = subprocess.run([sys.executable, "-c", library], capture_output=True, text=True)
    if not said.stdout.startswith("CKM003 pip install 'ckptmap[torch]'"):
        failures.append(f"ckptmap.migrate: {said.stdout}{said.stderr}")
    for call in ("ckptmap.load_into(None, 'src.safetensors', '')", "import ckptmap.dcp"):
        code = prefix + (
            f"import ckptmap\ntry:\n    {call}\n"
            "except ckptmap.CkptmapError as e:\n    print(e.code)\n"
        )
        said = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
        if said.stdout.strip() != "CKM003":
            failures.append(f"{call}: {said.stdout}{said.stderr}")
    check = prefix + "import ckptmap, ckptmap.cli, sys; print(sys.modules.get('torch') is not None)"
    imported = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True)
    if imported.stdout.strip() != "False":
        failures.append(f"import ckptmap: {imported.stdout}{imported.stderr}")
    if not block:
        try:
            import torch  # noqa: F401

            failures.append("torch is installed here: run this where it is not, or with --block")
        except ModuleNotFoundError:
            pass
    for f in failures:
        print(f"FAILED {f}", file=sys.stderr)
    print(
        f"without torch: {len(ok_runs)} commands ran, {len(needs_torch)} said how to add it; "
        f"{len(failures)} failures"
    )
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
