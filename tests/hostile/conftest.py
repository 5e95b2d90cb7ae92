"""The hostile-tenant suite: real nspawn machines from the runner's fixtures, some under a shim
with tight limits so that exhausting them is quick. Every machine is stopped and checked for
leftovers by the runner's stop_all."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.runner.conftest import (
    Shim,
    make_shim,
    shim,  # noqa: F401  (the runner's plain shim fixture)
    stop_all,
)

TIGHT_DISK = 64 << 20
TIGHT_MEMORY = 64 << 20


@pytest.fixture
def tight_shim(tmp_path: Path, busybox_rootfs: Path) -> Iterator[Shim]:
    """A shim whose machines get a 64 MiB disk and, unless their spec says, 64 MiB of memory."""
    made = make_shim(
        tmp_path, busybox_rootfs, tenant_disk_bytes=TIGHT_DISK, default_memory_bytes=TIGHT_MEMORY
    )
    try:
        yield made
    finally:
        stop_all(made)
