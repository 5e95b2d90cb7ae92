"""The booted test host, once per session (one boot, plus the reboot a test asks for).

Every test here is marked `system`; without root, debootstrap, nspawn or zstd they are skipped
with the reason. The test host's root comes from the cached tarball (built on first use, ~1
min), and a shared folder on this machine is bind-mounted read-write at the same path inside,
for tenant repositories and image trees the tests make from outside.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.system.testhost import FORKY, TestHost, missing_prerequisites, restored_root


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    here = Path(__file__).parent
    for item in items:
        if here in Path(str(item.fspath)).parents:
            item.add_marker(pytest.mark.system)
            item.add_marker(pytest.mark.slow)
            # The first test also builds (cold: debootstrap from the mirror) and boots the host.
            item.add_marker(pytest.mark.timeout(900))


@pytest.fixture(scope="session")
def shared_dir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="bb-system-", dir="/var/tmp"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="session")
def testhost(shared_dir: Path) -> Iterator[TestHost]:
    problems = missing_prerequisites()
    if problems:
        pytest.skip("no booted test host here: " + ", ".join(problems))
    with restored_root() as root:
        host = TestHost(root, binds_rw=[shared_dir], console_log=shared_dir / "console.log")
        with host:
            yield host


@pytest.fixture(scope="module")
def forky(shared_dir: Path) -> Iterator[TestHost]:
    """A booted forky test host (systemd with vmspawn, qemu, virtiofsd), per module."""
    problems = missing_prerequisites()
    if problems:
        pytest.skip("no booted test host here: " + ", ".join(problems))
    devices = [Path("/dev/net/tun")] + ([Path("/dev/kvm")] if Path("/dev/kvm").exists() else [])
    with restored_root(flavour=FORKY) as root:
        host = TestHost(
            root, binds_rw=[shared_dir, *devices], console_log=shared_dir / "forky-console.log"
        )
        with host:
            yield host
