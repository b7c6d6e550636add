"""Shared test helpers, and the two runs: `pytest` between commits (fast: the tests marked
`slow` are left out), `pytest --slow` for everything (what .ci/run and the README run)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

GOLDEN = Path(__file__).parent / "golden"


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--slow", action="store_true", help="also run the slow tests (benchmark, memory, wheel)"
    )


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "slow: seconds each (child processes, a wheel build); run with --slow"
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if config.getoption("--slow"):
        return
    slow = [item for item in items if item.get_closest_marker("slow")]
    if slow:
        config.hook.pytest_deselected(items=slow)
        items[:] = [item for item in items if not item.get_closest_marker("slow")]


@pytest.fixture
def ddp_checkpoint(tmp_path) -> Path:
    """A ResNet(1000) saved from DataParallel (`module.` keys), as a safetensors file."""
    import torch
    from models import ResNet, wrapped
    from safetensors.torch import save_file

    torch.manual_seed(0)
    path = tmp_path / "ddp.safetensors"
    save_file(wrapped(ResNet(1000)), path)
    return path


@pytest.fixture
def ddp_rules() -> str:
    """The shipped DataParallel rule file (`strip "module."`), as a path string."""
    return str(Path(__file__).resolve().parents[1] / "rules" / "ddp.ckmap")


@pytest.fixture
def golden():
    """Compare text with a file under tests/golden (UPDATE_GOLDEN=1 rewrites the file)."""

    def check(name: str, text: str) -> None:
        path = GOLDEN / name
        if os.environ.get("UPDATE_GOLDEN"):
            path.write_text(text)
        assert text == path.read_text(), f"{name} differs (UPDATE_GOLDEN=1 to accept)"

    return check
