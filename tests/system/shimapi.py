"""A minimal client for the shim API inside the test host, from outside it.

The socket lives in the test host's /run; this machine reaches it through the leader's root
(/proc/PID/root/...), as root, so the shim's peer-credential check sees uid 0.
"""

from __future__ import annotations

import http.client
import json
import socket
from typing import Any

from tests.system.testhost import TestHost

SOCKET = "/run/bitbuilder/hostshim.sock"


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self.path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        sock.connect(self.path)
        self.sock = sock


def call(
    host: TestHost, method: str, path: str, body: object = None, timeout: float = 180.0
) -> tuple[int, Any]:
    conn = _UnixConnection(f"/proc/{host.leader}/root{SOCKET}", timeout)
    try:
        data = json.dumps(body).encode() if body is not None else None
        headers = {"Content-Type": "application/json"} if data is not None else {}
        conn.request(method, path, body=data, headers=headers)
        response = conn.getresponse()
        text = response.read().decode()
        return response.status, json.loads(text) if text else None
    finally:
        conn.close()


def ok(host: TestHost, method: str, path: str, body: object = None) -> Any:
    status, doc = call(host, method, path, body)
    assert status == 200, f"{method} {path} -> {status}: {doc}"
    return doc
