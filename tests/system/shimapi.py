"""The shim API inside the test host, from outside it.

The socket lives in the test host's /run; this machine reaches it through the leader's root
(/proc/PID/root/...), as root, so the shim's peer-credential check sees uid 0. The leader
changes on reboot, so each call makes its client afresh.
"""

from __future__ import annotations

from typing import Any

from tests.shim.harness import Reply, ShimClient
from tests.system.testhost import TestHost

SOCKET = "/run/bitbuilder/hostshim.sock"


def call(host: TestHost, method: str, path: str, body: object = None) -> Reply:
    client = ShimClient(f"/proc/{host.leader}/root{SOCKET}", timeout=180.0)
    return client.request(method, path, body)


def ok(host: TestHost, method: str, path: str, body: object = None) -> Any:
    reply = call(host, method, path, body)
    assert reply.status == 200, f"{method} {path} -> {reply.status}: {reply.body}"
    return reply.body
