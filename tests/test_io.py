"""Checkpoint readers: torch pickles (safely), nested training checkpoints, safetensors headers."""

from __future__ import annotations

import os

import pytest
import torch
from safetensors.torch import save_file

import ckptmap
from ckptmap.io import open_checkpoint


class Payload:
    def __reduce__(self):
        return (os.system, ("touch PWNED",))


def test_a_pickle_that_runs_code_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "evil.pt"
    torch.save({"w": torch.ones(1), "x": Payload()}, path)
    with pytest.raises(ckptmap.CheckpointError) as info:
        open_checkpoint(path).meta()
    assert info.value.code == "CKM521"
    assert "posix.system" in info.value.message or "system" in info.value.message
    assert not (tmp_path / "PWNED").exists()


def test_legacy_non_zip_file_loads(tmp_path):
    path = tmp_path / "legacy.pt"
    torch.save({"a": torch.arange(3.0)}, path, _use_new_zipfile_serialization=False)
    ckpt = open_checkpoint(path)
    assert ckpt.meta()["a"].shape == (3,)
    assert torch.equal(ckpt.get("a"), torch.arange(3.0))


def test_nested_training_checkpoint_is_picked(tmp_path):
    path = tmp_path / "train.pt"
    torch.save({"epoch": 3, "model": {"w": torch.ones(2)}, "optimizer": {"lr": 0.1}}, path)
    assert list(open_checkpoint(path).meta()) == ["w"]


def test_ambiguous_nesting_lists_the_candidates(tmp_path):
    path = tmp_path / "train.pt"
    torch.save({"model": {"w": torch.ones(2)}, "ema": {"w": torch.zeros(2)}}, path)
    with pytest.raises(ckptmap.CheckpointError) as info:
        open_checkpoint(path).meta()
    assert "model" in info.value.message and "ema" in info.value.message
    assert open_checkpoint(path, select="ema").get("w").sum() == 0


def test_safetensors_plan_reads_the_header_only(tmp_path):
    path = tmp_path / "m.safetensors"
    save_file({"module.w": torch.ones(2, 3, dtype=torch.bfloat16)}, path)
    plan = ckptmap.compile('strip "module."').plan(path)
    assert plan.sources[0].shape == [2, 3] and plan.sources[0].dtype == "bfloat16"
    out = plan.apply(path)
    assert torch.equal(out["w"], torch.ones(2, 3, dtype=torch.bfloat16))


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_large_tensors_are_read_in_parallel_ranges_exactly(tmp_path, monkeypatch, threads):
    import ckptmap.io.safetensors as st_io

    monkeypatch.setattr(st_io, "READ_PIECE", 1)
    monkeypatch.setattr(torch, "get_num_threads", lambda: threads)
    sd = {"a": torch.arange(5000, dtype=torch.float64), "b": torch.arange(7).to(torch.bfloat16)}
    path = tmp_path / "m.safetensors"
    save_file(sd, path)
    assert len(st_io._pieces(40_000, threads)) == threads  # 4096-byte aligned ranges
    ckpt = open_checkpoint(path)
    for name, expected in sd.items():
        got = torch.full_like(expected, -1)
        ckpt.raw(name).read_into(got)
        assert torch.equal(got, expected)


def _read_all(path):
    ckpt = open_checkpoint(path)
    for name, meta in ckpt.meta().items():
        ckpt.raw(name).read_into(torch.empty(meta.shape, dtype=getattr(torch, meta.dtype)))


@pytest.mark.skipif(not hasattr(os, "fork"), reason="fork is POSIX")
def test_parallel_reads_work_in_a_forked_child(tmp_path, monkeypatch):
    """A child forked after the parent read in parallel makes its own reading threads
    (the parent's are not there: waiting on them would hang)."""
    import multiprocessing

    import ckptmap.io.safetensors as st_io

    monkeypatch.setattr(st_io, "READ_PIECE", 1)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    path = tmp_path / "m.safetensors"
    save_file({"a": torch.arange(5000, dtype=torch.float64)}, path)
    _read_all(path)  # the parent's pool exists now
    child = multiprocessing.get_context("fork").Process(target=_read_all, args=(path,))
    child.start()
    child.join(timeout=60)
    if child.is_alive():
        child.kill()
    assert child.exitcode == 0


def test_truncated_safetensors_is_a_clear_error(tmp_path):
    path = tmp_path / "cut.safetensors"
    save_file({"w": torch.ones(4)}, path)
    path.write_bytes(path.read_bytes()[:20])
    with pytest.raises(ckptmap.CheckpointError) as info:
        open_checkpoint(path).meta()
    assert info.value.code == "CKM510"


def test_a_safetensors_header_of_128_bytes_is_not_taken_for_a_pickle(tmp_path):
    """The 8-byte length 128 begins with 0x80, the first byte of a pickle."""
    import json

    from ckptmap.io.safetensors import SafetensorsCheckpoint

    for n in range(1, 120):  # some header among these is exactly 128 bytes long
        path = tmp_path / f"m{n}.safetensors"
        save_file({"x" * n: torch.ones(1)}, path)
        if path.read_bytes()[0] == 0x80:
            assert isinstance(open_checkpoint(path), SafetensorsCheckpoint)
            assert json.loads(path.read_bytes()[8:136])  # the header indeed is 128 bytes
            return
    pytest.fail("no 128-byte header produced")
