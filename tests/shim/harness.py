"""A real shim server in a thread on a unix socket, and a small synchronous client for it."""

from __future__ import annotations

import asyncio
import http.client
import json
import socket
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bitbuilder.hostshim.config import ShimConfig
from bitbuilder.hostshim.machine.manager import MachineManager
from bitbuilder.hostshim.server.app import serve
from tests.helpers.wait import wait_for

JSON = "application/json"
DAEMON = str(Path(sys.executable).parent / "bitbuilder-hostshim")


def daemon_argv(config: ShimConfig, drift_interval: float = 0) -> list[str]:
    """`bitbuilder-hostshim` over `config` with the direct executor (drift 0: never checked)."""
    return [
        DAEMON, "--state-dir", str(config.state_dir), "--runtime-dir", str(config.runtime_dir),
        "--socket", str(config.socket_path), "--executor", "direct",
        "--drift-interval", str(drift_interval),
        *[a for p in config.trusted_image_paths for a in ("--trusted-image-path", str(p))],
        *[a for p in config.file_source_roots for a in ("--file-source-root", str(p))],
        *[a for n in config.source_networks for a in ("--allow-source-network", str(n))],
    ]  # fmt: skip


class UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        sock.connect(self._path)
        self.sock = sock


@dataclass
class Reply:
    status: int
    body: Any
    content_type: str


class ShimClient:
    """One request per connection: simple, and each request sees a fresh peer check."""

    def __init__(self, socket_path: str, timeout: float = 60.0) -> None:
        self.socket_path = socket_path
        self.timeout = timeout

    def request(
        self,
        method: str,
        path: str,
        body: object = None,
        *,
        raw: bytes | None = None,
        content_type: str | None = JSON,
    ) -> Reply:
        conn = UnixConnection(self.socket_path, self.timeout)
        try:
            data = raw if raw is not None else None if body is None else json.dumps(body).encode()
            headers = {"Content-Type": content_type} if content_type and data is not None else {}
            conn.request(method, path, body=data, headers=headers)
            resp = conn.getresponse()
            payload = resp.read()
            ctype = resp.getheader("Content-Type", "")
            parsed = json.loads(payload) if ctype.startswith(JSON) else payload.decode()
            return Reply(resp.status, parsed, ctype)
        finally:
            conn.close()

    def put(self, spec: dict[str, Any]) -> Reply:
        return self.request("PUT", f"/v1/machines/{spec['name']}", spec)

    def get(self, name: str) -> Reply:
        return self.request("GET", f"/v1/machines/{name}")

    def delete(self, name: str, keep_data: bool | None = None) -> Reply:
        query = "" if keep_data is None else f"?keepData={str(keep_data).lower()}"
        return self.request("DELETE", f"/v1/machines/{name}{query}")


class ServerThread:
    """serve() on its own event loop in a thread; stop() leaves machines running."""

    def __init__(
        self, manager: MachineManager, config: ShimConfig, drift_interval: float | None = None
    ) -> None:
        self.manager = manager
        self.config = config
        self.drift_interval = drift_interval
        self._ready = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="shim-server", daemon=True)

    def _run(self) -> None:
        async def main() -> None:
            self._loop = asyncio.get_running_loop()
            self._stop = asyncio.Event()
            await serve(
                self.manager,
                self.config,
                self._stop,
                drift_interval=self.drift_interval,
                ready=self._ready.set,
            )

        try:
            asyncio.run(main())
        except BaseException as exc:
            self._error = exc
            self._ready.set()

    def start(self) -> ServerThread:
        self._thread.start()
        if not self._ready.wait(30) or self._error is not None:
            raise RuntimeError(f"shim did not start: {self._error!r}")
        return self

    def stop(self) -> None:
        if self._loop is not None and self._stop is not None and self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(30)
        assert not self._thread.is_alive(), "shim server thread did not stop"


def wait_resumed(client: ShimClient) -> None:
    """Until the shim has finished its startup work (or refuses us: then there is nothing to see)."""

    def done() -> bool:
        reply = client.request("GET", "/healthz")
        return reply.status == 403 or bool(reply.body["resumed"])

    wait_for(done, what="the shim to resume its tenants")
