"""Pieces of `bitbuilder demo` that decide what its clean-up may delete."""

from __future__ import annotations

from pathlib import Path

from bitbuilder.operator.demo import mounts_under


def test_mounts_under() -> None:
    assert "/proc" in mounts_under(Path("/proc"))
    assert "/proc" in mounts_under(Path("/"))
    assert mounts_under(Path("/pro")) == []  # a prefix of a name is not a parent folder


def test_no_mounts_in_a_fresh_folder(tmp_path: Path) -> None:
    assert mounts_under(tmp_path) == []
