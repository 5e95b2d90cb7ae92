"""The runner's running machines, kept so a status read costs no file, /proc or systemctl read.

Each entry holds a pidfd of the machine's supervising process (nspawn, or its unit's main
process): an entry is used only while one poll of that pidfd says the process lives, so a
machine that died is never reported running, and a reused pid is never taken for it (a pidfd
names one process, not a number).
"""

from __future__ import annotations

import os
import select
import threading
from collections.abc import Callable
from typing import Generic, TypeVar

T = TypeVar("T")


def exited(pidfd: int, timeout: float = 0.0) -> bool:
    """Has the process behind `pidfd` exited (waiting up to `timeout` s)? poll, not select:
    with a pidfd kept per running machine, fds pass select's limit of 1024."""
    poller = select.poll()
    poller.register(pidfd, select.POLLIN)
    return bool(poller.poll(max(timeout, 0.0) * 1000))


class LiveMachines(Generic[T]):
    def __init__(self) -> None:
        self._entries: dict[str, tuple[T, int]] = {}
        # Bumped by forget(): a put() prepared before it (from files read before a stop) is void.
        self._generations: dict[str, int] = {}
        self._guard = threading.Lock()  # also keeps an fd from being closed while polled

    def generation(self, name: str) -> int:
        with self._guard:
            return self._generations.get(name, 0)

    def get(self, name: str) -> T | None:
        with self._guard:
            entry = self._entries.get(name)
            if entry is None:
                return None
            if not exited(entry[1]):
                return entry[0]
            self._drop(name)
            return None

    def put(
        self, name: str, machine: T, pid: int, generation: int, still_ours: Callable[[], bool]
    ) -> None:
        """Keep `machine` (whose process is `pid`) while that process lives. `still_ours` is
        asked after the pidfd is open: the pid named the machine's process then, too."""
        try:
            fd = os.pidfd_open(pid)
        except OSError:  # gone already; or out of fds: reads just stay uncached
            return
        keep = False
        try:
            keep = still_ours()
        finally:
            with self._guard:
                if keep and self._generations.get(name, 0) == generation:
                    self._drop(name)
                    self._entries[name] = (machine, fd)
                else:
                    os.close(fd)

    def forget(self, name: str) -> None:
        with self._guard:
            self._generations[name] = self._generations.get(name, 0) + 1
            self._drop(name)

    def _drop(self, name: str) -> None:
        entry = self._entries.pop(name, None)
        if entry is not None:
            os.close(entry[1])
