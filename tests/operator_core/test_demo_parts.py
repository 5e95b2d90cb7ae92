"""Pieces of `bitbuilder demo` that decide what its clean-up may delete."""

from __future__ import annotations

from pathlib import Path

import pytest

from bitbuilder.operator import demo
from bitbuilder.operator.demo import mounts_under


def test_mounts_under() -> None:
    assert "/proc" in mounts_under(Path("/proc"))
    assert "/proc" in mounts_under(Path("/"))
    assert mounts_under(Path("/pro")) == []  # a prefix of a name is not a parent folder


def test_no_mounts_in_a_fresh_folder(tmp_path: Path) -> None:
    assert mounts_under(tmp_path) == []


def test_ctrl_c_cleans_up_and_exits_130_without_a_traceback(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    async def interrupted(self: demo.Demo) -> None:
        raise KeyboardInterrupt

    cleaned: list[bool] = []
    monkeypatch.setattr(demo, "preflight", lambda: None)
    monkeypatch.setattr(demo.Demo, "run", interrupted)
    monkeypatch.setattr(demo, "cleanup", lambda _demo, keep_files: cleaned.append(keep_files))
    assert demo.run_demo(tmp_path / "work", keep=False) == 130
    assert cleaned == [False]
    assert capsys.readouterr().err == "interrupted\n"
