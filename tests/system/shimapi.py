"""The shim API inside the test host, from outside it.

The socket lives in the test host's /run; this machine reaches it through the leader's root
(/proc/PID/root/...), as root, so the shim's peer-credential check sees uid 0. The leader
changes on reboot, so each call makes its client afresh.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from tests.helpers.wait import wait_for
from tests.shim.harness import Reply, ShimClient
from tests.system.testhost import TestHost

SOCKET = "/run/bitbuilder/hostshim.sock"
BIN = Path(sys.prefix) / "bin"
DROP_IN = "/etc/systemd/system/bitbuilder-hostshim.service.d/10-test.conf"


def install_shim(host: TestHost, source_root: Path, images: Path) -> None:
    """The project's units and generator in the test host, the shim's service reading repos
    from `source_root` (file://) and images from `images`; enabling them is the caller's."""
    host.run(str(BIN / "bitbuilder-hostshim-install"))
    # No tenant disk images here: the test host has no e2fsprogs and only /dev/loop0-7, while
    # loop indexes are shared with the machine running the tests (tests/hostile covers them).
    flags = (
        f"--file-source-root={source_root} --trusted-image-path={images} --drift-interval=0 "
        "--tenant-disk-size=0"
    )
    host.enter("mkdir", "-p", str(Path(DROP_IN).parent))
    host.enter(
        "sh", "-c",
        f"printf '[Service]\\nExecStart=\\nExecStart=bitbuilder-hostshim {flags}\\n' > {DROP_IN}",
    )  # fmt: skip
    host.enter("systemctl", "daemon-reload")


def call(host: TestHost, method: str, path: str, body: object = None) -> Reply:
    client = ShimClient(f"/proc/{host.leader}/root{SOCKET}", timeout=180.0)
    return client.request(method, path, body)


def ok(host: TestHost, method: str, path: str, body: object = None) -> Any:
    reply = call(host, method, path, body)
    assert reply.status == 200, f"{method} {path} -> {reply.status}: {reply.body}"
    return reply.body


def shim_active(host: TestHost) -> bool:
    state = host.enter("systemctl", "is-active", "bitbuilder-hostshim.service", check=False)
    return state.stdout.strip() == "active" and Path(f"/proc/{host.leader}/root{SOCKET}").exists()


def start_shim(host: TestHost) -> None:
    host.enter("systemctl", "start", "bitbuilder-hostshim.service")
    wait_for(lambda: shim_active(host), timeout=60, what="the shim's socket")
