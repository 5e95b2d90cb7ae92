"""Fixtures of more than one area (an area's own live in its conftest.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.helpers.rootfs import cached_busybox_rootfs


@pytest.fixture(scope="session")
def busybox_rootfs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The busybox test image, built once per session for every area that boots machines."""
    return cached_busybox_rootfs(tmp_path_factory.getbasetemp() / "rootfs-cache")
