"""A tenant's writable layer on an image of its own size: made, kept, grown, never hiding a
layer that was there before."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from bitbuilder.hostshim.config import ShimConfig
from bitbuilder.hostshim.machine.datadisk import mount_data, unmount_data
from bitbuilder.hostshim.paths import TenantPaths
from tests.helpers.needs import needs_root_and

pytestmark = needs_root_and("mount", "mkfs.ext4", "resize2fs")
MiB = 1 << 20


@pytest.fixture
def paths(tmp_path: Path) -> Iterator[TenantPaths]:
    made = TenantPaths(ShimConfig(state_dir=tmp_path / "state", runtime_dir=tmp_path / "run"), "t1")
    try:
        yield made
    finally:
        unmount_data(made)


def size_of(folder: Path) -> int:
    st = os.statvfs(folder)
    return st.f_blocks * st.f_frsize


def test_the_layer_is_a_file_system_of_its_size_kept_and_grown(paths: TenantPaths) -> None:
    mount_data(paths, 96 * MiB)
    assert os.path.ismount(paths.data)
    assert 80 * MiB < size_of(paths.data) <= 96 * MiB
    assert paths.data_image.stat().st_blocks * 512 < 32 * MiB, "sparse: a limit, not a reservation"
    assert oct(paths.data_image.stat().st_mode & 0o777) == "0o600"
    (paths.data / "kept").write_text("x")
    unmount_data(paths)
    assert not os.path.ismount(paths.data) and not (paths.data / "kept").exists()
    mount_data(paths, 160 * MiB)
    assert (paths.data / "kept").read_text() == "x", "the same image again"
    assert size_of(paths.data) > 130 * MiB, "grown to the new size"
    unmount_data(paths)
    mount_data(paths, 64 * MiB)
    assert size_of(paths.data) > 130 * MiB, "never shrunk under the tenant's data"


def test_a_layer_made_before_quotas_is_used_as_it_is(paths: TenantPaths) -> None:
    (paths.data / "upper").mkdir(parents=True)
    (paths.data / "upper" / "db").write_text("tenant data")
    mount_data(paths, 96 * MiB)
    assert not os.path.ismount(paths.data), "never hidden under a new, empty image"
    assert (paths.data / "upper" / "db").read_text() == "tenant data"
    assert not paths.data_image.exists()


def test_no_quota_configured_means_a_plain_directory(paths: TenantPaths) -> None:
    mount_data(paths, None)
    assert paths.data.is_dir() and not os.path.ismount(paths.data)
    assert not paths.data_image.exists()
