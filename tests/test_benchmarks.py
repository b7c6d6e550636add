"""The benchmark harness runs end to end at a tiny size (its numbers are not checked here:
timings belong in the benchmark, never in tests)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "run.py"

pytestmark = pytest.mark.slow  # child processes: seconds each


def test_harness_runs_and_reports_every_target(tmp_path):
    out = tmp_path / "results.json"
    subprocess.run(
        [
            sys.executable,
            str(BENCH),
            "--size-mb",
            "4",
            "--keys",
            "300",
            "--big-keys",
            "3000",
            "--repeat",
            "1",
            "--workdir",
            str(tmp_path / "work"),
            "--json",
            str(out),
        ],
        check=True,
        capture_output=True,
        timeout=600,
    )
    data = json.loads(out.read_text())
    assert len(data["checks"]) == 25
    assert data["planning"]["keys"] == 300 and data["planning"]["ok"]
    assert data["planning_big"]["keys"] == 3000 and data["planning_big"]["ok"]
    # the earlier planner ran from its own source and gave the same fingerprint
    assert data["planning_before"]["plan_fingerprint"] == data["planning"]["plan_fingerprint"]
    assert {"cp", "ckptmap apply (rename, st -> st)"} <= set(data["results"])
