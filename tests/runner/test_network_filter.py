"""The shared nftables table's bookkeeping, without machines: a link's filter made by a shim
from before the shared table is removed with it; a reservation a crash left is cleared with
its elements (a port forward to its address must not reach the next holder); a pool lock held
too long is a classified error. Each case uses a subnet outside the machine pool and its own
link name, so it touches nothing of a running shim's."""

from __future__ import annotations

import fcntl
import ipaddress
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from bitbuilder.hostshim.errors import MachineError
from bitbuilder.hostshim.machine import network
from bitbuilder.hostshim.machine.network import RESERVATIONS, TABLE, filter_entries, link_name
from tests.helpers.needs import needs_root_and
from tests.runner.conftest import unique_name

pytestmark = needs_root_and("nft", "ip")
SCOPE = "test"


def nft(script: str) -> None:
    subprocess.run(["nft", "-f", "-"], input=script, text=True, check=True, timeout=30)


@pytest.fixture
def reserved() -> Iterator[tuple[str, Path]]:
    """A tenant name and its reservation file (10.251.x: not the pool), removed after."""
    name = unique_name("nf")
    RESERVATIONS.mkdir(parents=True, exist_ok=True)
    path = RESERVATIONS / f"10.251.{os.getpid() % 250}.{4 * (int(name[-2:], 16) % 63)}"
    path.write_text(link_name(SCOPE, name))
    try:
        yield name, path
    finally:
        path.unlink(missing_ok=True)
        subprocess.run(["ip", "link", "del", link_name(SCOPE, name)], capture_output=True)
        for line in filter_entries(link_name(SCOPE, name)):
            subprocess.run(["nft", line], capture_output=True)


def test_a_link_filter_from_before_the_shared_table_goes_at_its_teardown(
    reserved: tuple[str, Path],
) -> None:
    """As a machine an older shim started has it: its link, a reservation (no index) and a
    table of its own, all gone with its teardown."""
    name, path = reserved
    ifname = link_name(SCOPE, name)
    subprocess.run(
        ["ip", "link", "add", ifname, "type", "veth", "peer", "name", f"{ifname}p"],
        check=True,
        timeout=30,
    )
    nft(f"""table inet bitbuilder_{ifname} {{
  chain input {{ type filter hook input priority -10; policy accept; iifname "{ifname}" drop; }}
}}""")
    assert filter_entries(ifname) == [f"table inet bitbuilder_{ifname}"]
    network.teardown_link(SCOPE, name)
    assert filter_entries(ifname) == [] and not path.exists()
    assert not Path("/sys/class/net", ifname).exists()


def test_a_reservation_left_by_a_crash_is_cleared_with_its_elements(
    reserved: tuple[str, Path],
) -> None:
    name, path = reserved
    ifname = link_name(SCOPE, name)
    host = str(ipaddress.IPv4Network(f"{path.name}/30").network_address + 1)
    machine = str(ipaddress.IPv4Address(host) + 1)
    port = 40000 + int(name[-3:], 16) % 20000
    nft(
        network._BASE
        + f"""add element {TABLE} links {{ "{ifname}" }}
add element {TABLE} host_ok {{ "{ifname}" . {host} }}
add element {TABLE} masq {{ "{ifname}" : {host} }}
add element {TABLE} forwards {{ udp . {port} : {machine} . 53 }}
"""
    )
    assert len(filter_entries(ifname)) == 4
    network.sweep_stale_reservations()  # at each shim start, and when the pool is full
    assert len(filter_entries(ifname)) == 4 and path.exists(), "a fresh reservation is kept"
    old = time.time() - network.RESERVATION_GRACE - 10
    os.utime(path, (old, old))
    network.sweep_stale_reservations()
    assert filter_entries(ifname) == [] and not path.exists()


def test_a_pool_lock_held_too_long_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(network, "POOL_LOCK_TIMEOUT", 0.2)
    with network.POOL_LOCK.open("a") as held:
        fcntl.flock(held, fcntl.LOCK_EX)  # another open file: as another process would
        with pytest.raises(MachineError) as busy, network._pool_lock():
            pass
    assert busy.value.reason == "NetworkPoolBusy"
    assert str(network.POOL_LOCK) in busy.value.message
