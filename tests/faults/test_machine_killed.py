"""kill -9 of a machine: the drift check notices and restarts it from its applied revision,
with its writable data, and nothing of the killed run stays on the host."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest

from tests.faults.conftest import FAULTS, MARKER, FaultHost
from tests.helpers.wait import wait_for

pytestmark = FAULTS


@pytest.mark.parametrize("victim", ["nspawn", "leader"])
def test_killed_machine_is_restarted_by_drift(fault_host: FaultHost, victim: str) -> None:
    """`nspawn`: the supervising process dies, its machine's processes linger in the cgroups;
    `leader`: the machine's init dies, nspawn exits with it."""
    host = fault_host
    host.stop_shim()
    host.start_shim(drift_interval=0.2)
    host.repo("web")
    host.repo("api")
    first = host.running("web")
    other = host.running("api", network={"mode": "none"})
    host.in_machine(first["leaderPid"], MARKER).write_text("kept\n")
    [nspawn] = host.nspawns("web")

    os.kill(nspawn if victim == "nspawn" else first["leaderPid"], signal.SIGKILL)

    def restarted() -> dict[str, object] | None:
        status = host.status("web")
        return (
            status if status.get("driftCorrections") == 1 and status["phase"] == "Running" else None
        )

    after = wait_for(restarted, 60, what="the drift check to restart web")
    assert after["leaderPid"] != first["leaderPid"]
    assert after["appliedRevision"] == first["appliedRevision"]
    assert after["lastDrift"]["reason"] == "MachineRestarted"  # type: ignore[index]
    leader = after["leaderPid"]
    assert isinstance(leader, int)
    assert host.in_machine(leader, MARKER).read_text() == "kept\n", "writable data kept"
    wait_for(lambda: not Path(f"/proc/{first['leaderPid']}").exists(), 10, what="old leader gone")
    host.one_machine("web")
    assert host.nspawns("web") != [nspawn]
    assert host.status("api")["leaderPid"] == other["leaderPid"], "the other tenant untouched"
