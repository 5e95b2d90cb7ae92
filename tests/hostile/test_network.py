"""A tenant's machine reaching for the host through its link: the host's address on that link
and the host's loopback services, over TCP and ICMP. Root in the machine re-routes as it likes
(it owns its network namespace); the host's filter on the link drops it all.

What arrives is watched with raw sockets bound to the machine's link: the kernel hands them a
packet only once the host's input filter has let it through, so a packet the host could not
answer (a SYN to 127.0.0.1, whose reply cannot leave by the link) still shows.
(Reaching another tenant, and the host side of the neighbour's link, is in
tests/runner/test_machines.py::test_tenants_cannot_see_each_other.) Only addresses of links the
test's machines own and the host's loopback are used.
"""

from __future__ import annotations

import contextlib
import ipaddress
import socket
from collections.abc import Callable, Iterator

import pytest

from bitbuilder.hostshim.machine.executor import shim_scope
from bitbuilder.hostshim.machine.network import link_name
from bitbuilder.hostshim.machine.runner import RunningMachine
from tests.runner.conftest import Shim, needs_nspawn
from tests.runner.test_machines import host_side

pytestmark = [pytest.mark.nspawn, pytest.mark.hostile, needs_nspawn]


@contextlib.contextmanager
def delivered(shim: Shim, machine: RunningMachine) -> Iterator[Callable[[str], list[str]]]:
    """What the host delivered to its own sockets from the machine's link, to an address:
    ["tcp 10.250.0.2 -> 127.0.0.1", ...]."""
    ifname = link_name(shim_scope(shim.config), machine.name).encode()
    with contextlib.ExitStack() as stack:
        watchers = {}
        for name, proto in (("icmp", socket.IPPROTO_ICMP), ("tcp", socket.IPPROTO_TCP)):
            raw = stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_RAW, proto))
            raw.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, ifname)
            raw.setblocking(False)
            watchers[name] = raw

        def seen(target: str) -> list[str]:
            got = []
            for name, raw in watchers.items():
                with contextlib.suppress(BlockingIOError):
                    while packet := raw.recv(2048):
                        source, to = (ipaddress.IPv4Address(packet[i : i + 4]) for i in (12, 16))
                        got.append(f"{name} {source} -> {to}")
            return [packet for packet in got if packet.endswith(f" -> {target}")]

        yield seen


@contextlib.contextmanager
def listening(address: str) -> Iterator[tuple[socket.socket, int]]:
    """A TCP service of the host on `address` (port picked by the kernel)."""
    with socket.socket() as server:
        server.bind((address, 0))
        server.listen()
        server.setblocking(False)
        yield server, server.getsockname()[1]


def attempts(shim: Shim, machine: RunningMachine, address: str, port: int) -> list[int]:
    """TCP and ICMP from the machine to `address`: their exit codes."""
    return [
        shim.run_in(machine, "sh", "-c", command).returncode
        for command in (f"nc -w 2 {address} {port} </dev/null", f"ping -c 1 -W 1 {address}")
    ]


def test_the_hosts_address_on_the_link_is_closed(shim: Shim) -> None:
    evil = shim.start()
    neighbour = shim.start()
    with delivered(shim, evil) as seen, listening(host_side(evil)) as (server, port):
        assert 0 not in attempts(shim, evil, host_side(evil), port)
        with pytest.raises(BlockingIOError):
            server.accept()
        assert seen(host_side(evil)) == []
    assert shim.runner.inspect(neighbour.name) == neighbour


# Root in the machine sends 127.0.0.1 out of its link: it lets its end route loopback
# addresses, drops its own local routes for them and points them at host0. (The host's side
# has route_localnet for port forwards, so only the filter stands in the way.)
LOOPBACK_OVER_THE_LINK = """
sysctl -qw net.ipv4.conf.host0.route_localnet=1 net.ipv4.conf.all.route_localnet=1
ip route del local 127.0.0.1 table local
ip route del local 127.0.0.0/8 table local
ip route add 127.0.0.1/32 dev host0 && echo rerouted
"""


def test_host_loopback_services_are_out_of_reach(shim: Shim) -> None:
    evil = shim.start()
    neighbour = shim.start()
    with delivered(shim, evil) as seen, listening("127.0.0.1") as (server, port):
        rerouted = shim.run_in(evil, "sh", "-c", LOOPBACK_OVER_THE_LINK)
        assert "rerouted" in rerouted.stdout, rerouted.stderr
        assert "host0" in shim.run_in(evil, "ip", "route", "get", "127.0.0.1").stdout
        assert 0 not in attempts(shim, evil, "127.0.0.1", port)
        with pytest.raises(BlockingIOError):
            server.accept()
        assert seen("127.0.0.1") == []
    assert shim.runner.inspect(neighbour.name) == neighbour
