"""The standalone benchmarks' host: a temporary root, git daemon on loopback, the cached busybox
root fs, and tests/standalone's Host over them, torn down whatever happens."""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from tests.helpers.gitserve import git_daemon
from tests.helpers.rootfs import cached_busybox_rootfs
from tests.standalone.conftest import Host


@contextmanager
def bench_host(prefix: str) -> Iterator[Host]:
    rootfs = cached_busybox_rootfs(Path("/var/tmp/bitbuilder-bench-rootfs"))
    with tempfile.TemporaryDirectory(prefix=prefix) as tmp:
        root = Path(tmp)
        (root / "git").mkdir()
        with git_daemon(root / "git") as server:
            host = Host(root, server, rootfs)
            try:
                yield host
            finally:
                host.teardown()
