"""Each tenant's status and its JSON, made once per change instead of once per read.

A status depends on the tenant's saved state and busy phase, which change only through the
manager (it calls changed()), and on its running machine, which may die on its own: an entry
is used only while the runner answers with the very same machine object (the runner keeps it
while one poll of its pidfd says the process lives). So a list of N machines costs N dict
lookups and polls and one join of ready JSON, not N reads of /proc and record files.
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass

from bitbuilder.hostshim.api import MachineStatus


@dataclass(frozen=True)
class CachedStatus:
    status: MachineStatus
    body: bytes  # status.wire() as JSON
    machine: object | None  # the runner's answer it was made with


class StatusCache:
    def __init__(self) -> None:
        self._entries: dict[str, CachedStatus] = {}
        self._versions: dict[str, int] = {}
        self._guard = threading.Lock()

    def changed(self, name: str) -> None:
        """After (never before) a change that the status shows."""
        with self._guard:
            self._versions[name] = self._versions.get(name, 0) + 1
            self._entries.pop(name, None)

    def version(self, name: str) -> int:
        """Taken before reading what a status is made of: store() with it is void if a change
        came in between (that reader may have seen the old state)."""
        with self._guard:
            return self._versions.get(name, 0)

    def lookup(self, name: str, machine: object | None) -> CachedStatus | None:
        entry = self._entries.get(name)
        return entry if entry is not None and entry.machine is machine else None

    def store(
        self, name: str, version: int, machine: object | None, status: MachineStatus
    ) -> CachedStatus:
        entry = CachedStatus(status, json.dumps(status.wire()).encode(), machine)
        with self._guard:
            if self._versions.get(name, 0) == version:
                self._entries[name] = entry
        return entry
