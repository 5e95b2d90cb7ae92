"""A TCP proxy on loopback that holds every connection until its gate opens: a remote that is
slow exactly as long as a test wants (to catch a reconcile in the middle). With `rate`, what
the remote sends trickles at that many bytes per second (a large fetch that takes a while)."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from types import TracebackType


class GatedProxy:
    def __init__(self, target_port: int, rate: int | None = None) -> None:
        self.target_port = target_port
        self.rate = rate
        self.sent = 0  # bytes passed from the remote to its clients
        self.gate = threading.Event()
        self.held = threading.Event()  # set once a connection waits at the gate
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._listener.getsockname()[1]
        self._sockets: list[socket.socket] = [self._listener]
        threading.Thread(target=self._accept, daemon=True, name="gated-proxy").start()

    def __enter__(self) -> GatedProxy:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.gate.set()
        for sock in self._sockets:
            with contextlib.suppress(OSError):
                sock.close()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return  # closed
            self._sockets.append(client)
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client: socket.socket) -> None:
        self.held.set()
        self.gate.wait()
        try:
            upstream = socket.create_connection(("127.0.0.1", self.target_port))
        except OSError:
            client.close()
            return
        self._sockets.append(upstream)
        threading.Thread(target=self._down, args=(upstream, client), daemon=True).start()
        _pump(client, upstream)

    def _down(self, upstream: socket.socket, client: socket.socket) -> None:
        """The remote's bytes to the client, at most `rate` per second."""
        chunk = 65536 if self.rate is None else max(1, self.rate // 20)
        with contextlib.suppress(OSError):
            while data := upstream.recv(chunk):
                client.sendall(data)
                self.sent += len(data)
                if self.rate is not None:
                    time.sleep(len(data) / self.rate)  # throttling, not synchronisation
            client.shutdown(socket.SHUT_WR)


def _pump(source: socket.socket, sink: socket.socket) -> None:
    with contextlib.suppress(OSError):
        while data := source.recv(65536):
            sink.sendall(data)
        sink.shutdown(socket.SHUT_WR)
