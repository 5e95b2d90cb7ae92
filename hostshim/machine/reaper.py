"""One thread reaps every machine process this shim started, whenever it exits.

A thread per child blocked in wait() cost about 16 KiB of the shim's memory each: two per
machine (nspawn and its console reader), 16 MiB at 500 machines. Here each child is a pidfd
in one poll; the thread waits for the child once it is readable (it has exited), so the
zombie goes at once and Popen keeps its exit status.
"""

from __future__ import annotations

import os
import select
import subprocess
import threading
from typing import Any


class Reaper:
    def __init__(self) -> None:
        self._pending: list[tuple[int, subprocess.Popen[Any]]] = []
        self._guard = threading.Lock()
        self._wake: tuple[int, int] | None = None  # (read, write) ends; made with the thread

    def add(self, child: subprocess.Popen[Any]) -> None:
        try:
            fd = os.pidfd_open(child.pid)
        except OSError:  # out of fds: a thread of its own, as before
            threading.Thread(target=child.wait, name="reap", daemon=True).start()
            return
        with self._guard:
            self._pending.append((fd, child))
            if self._wake is None:
                self._wake = os.pipe()
                threading.Thread(target=self._run, args=(self._wake[0],), name="reaper",
                                 daemon=True).start()  # fmt: skip
            os.write(self._wake[1], b".")

    def _run(self, wake: int) -> None:
        # Only this thread touches the poll object and the pidfds once handed over.
        poller = select.poll()
        poller.register(wake, select.POLLIN)
        children: dict[int, subprocess.Popen[Any]] = {}
        while True:
            for fd, _ in poller.poll():
                if fd == wake:
                    os.read(wake, 4096)
                    with self._guard:
                        pending, self._pending = self._pending, []
                    for new, child in pending:
                        children[new] = child
                        poller.register(new, select.POLLIN)
                    continue
                poller.unregister(fd)
                children.pop(fd).wait()  # at once: it has exited
                os.close(fd)


REAPER = Reaper()
