"""A machine's network link: a veth pair from the host to the machine's own namespace.

nspawn creates the machine's network namespace (inside its user namespace) and moves the
runner's veth peer into it; the runner names, addresses and raises it from outside, so the
machine needs no DHCP client. Each link gets a /30 from the host-local pool: the host side is
.1, the machine .2. An nftables table per link drops everything the machine sends to the host
(except replies, and the host's own address on the link when allow_host is set) and every
packet forwarded from or to the link, so no two tenant links are ever routed together and a
machine reaches nothing beyond its link. (Root inside the machine may re-address its end;
the filter keys on the interface, not the address, so that gains it nothing.) Port forwards
are DNAT rules in the same table from the host's loopback to the machine's address.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import ipaddress
import json
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from bitbuilder.hostshim.api import NetworkSpec, PortForward
from bitbuilder.hostshim.errors import HostError, MachineError

DEFAULT_POOL = ipaddress.IPv4Network("10.250.0.0/16")
# The pool is shared by every shim on the host (tests run several), so allocation is locked
# host-wide and checked against the addresses actually configured.
POOL_LOCK = Path("/run/lock/bitbuilder-netpool.lock")
RESERVATIONS = Path("/run/lock/bitbuilder-netpool.d")
MACHINE_IFNAME = "host0"
RESERVATION_GRACE = 300.0  # s; far longer than prepare_link -> configure_link in any start


# The Debian package of each tool the network needs, for the error that says to install it.
_PACKAGES = {"nft": "nftables", "ip": "iproute2", "nsenter": "util-linux", "sysctl": "procps"}
# nft's words for a kernel without nf_tables (or a container whose seccomp filter hides it).
_NO_NFTABLES = ("Operation not supported", "Protocol not supported", "Address family not supp")


def _run(argv: list[str], what: str, stdin: str | None = None) -> str:
    tool = argv[0]
    try:
        result = subprocess.run(argv, input=stdin, capture_output=True, text=True)
    except FileNotFoundError as exc:
        package = _PACKAGES.get(tool, tool)
        raise HostError(
            f"{what}: {tool} is not installed on the host (not on the shim's PATH): "
            f"install the {package} package",
            reason="NftablesMissing" if tool == "nft" else "HostToolMissing",
        ) from exc
    if result.returncode != 0:
        error = result.stderr.strip()[:300]
        if tool == "nft" and any(words in error for words in _NO_NFTABLES):
            raise HostError(
                f"{what}: the kernel has no usable nftables ({error}): load nf_tables "
                "(modprobe nf_tables) or run the shim where it may use it",
                reason="NftablesMissing",
            )
        raise MachineError(f"{what}: {error}", reason="NetworkFailed")
    return result.stdout


def set_sysctl(key: str, value: str, netns_of: int | None = None) -> None:
    """sysctl `key`=`value`, in the network namespace of pid `netns_of` if given.

    A /proc/sys the shim cannot write (a container sharing the host's network has it
    read-only) is the host's set-up, said as such. An IPv6 key of a kernel without IPv6 needs
    no setting: there is nothing to disable."""
    enter = ["nsenter", "-t", str(netns_of), "--net"] if netns_of is not None else []
    try:
        _run([*enter, "sysctl", "-q", "-w", f"{key}={value}"], f"cannot set {key}")
    except HostError:
        raise
    except MachineError as exc:
        if "No such file" in exc.message and key.startswith("net.ipv6."):
            return
        if "denied" in exc.message or "Read-only" in exc.message:
            raise HostError(
                f"{exc.message}: /proc/sys is not writable where the shim runs (a container "
                "that shares the host's network gets it read-only): run the shim on the host, "
                "or in a container with a writable /proc/sys/net",
                reason="SysctlDenied",
            ) from exc
        raise


def _quiet(argv: list[str]) -> None:
    """For removals: whatever is already gone (or cannot exist) is fine."""
    with contextlib.suppress(FileNotFoundError):
        subprocess.run(argv, capture_output=True)


@dataclass(frozen=True)
class Link:
    """One machine's link as created; stored in the run record."""

    host_ifname: str
    machine_ifname: str  # the peer nspawn moves into the machine (renamed host0 there)
    host_address: str  # "10.250.0.1/30"
    machine_address: str  # "10.250.0.2/30"

    @property
    def address(self) -> str:
        return self.machine_address.split("/")[0]

    def to_json(self) -> dict[str, str]:
        return {
            "hostIfname": self.host_ifname,
            "machineIfname": self.machine_ifname,
            "hostAddress": self.host_address,
            "machineAddress": self.machine_address,
        }

    @classmethod
    def from_json(cls, data: dict[str, str]) -> Link:
        return cls(
            host_ifname=data["hostIfname"],
            machine_ifname=data["machineIfname"],
            host_address=data["hostAddress"],
            machine_address=data["machineAddress"],
        )


def _table(ifname: str) -> str:
    return f"bitbuilder_{ifname}"


def link_name(scope: str, name: str) -> str:
    """A host interface name (<= 15 chars) unique per shim scope and machine."""
    return "bb" + hashlib.sha256(f"{scope}/{name}".encode()).hexdigest()[:11]


@contextmanager
def _pool_lock() -> Iterator[None]:
    POOL_LOCK.parent.mkdir(parents=True, exist_ok=True)
    with POOL_LOCK.open("a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        yield


def _used_networks() -> set[ipaddress.IPv4Network]:
    entries = json.loads(_run(["ip", "-j", "-4", "addr", "show"], "cannot list addresses"))
    used = set()
    for entry in entries:
        for info in entry.get("addr_info", []):
            used.add(ipaddress.IPv4Interface(f"{info['local']}/{info['prefixlen']}").network)
    return used


def _reserved_networks() -> set[ipaddress.IPv4Network]:
    """Subnets held for a link: it exists (maybe not addressed yet), or its start is still under
    way. Not by listing nftables tables: with hundreds of machines that took seconds, under the
    pool lock. A reservation left by a crash is passed over here and removed by the teardown."""
    if not RESERVATIONS.is_dir():
        return set()
    reserved = set()
    now = time.time()
    for entry in RESERVATIONS.iterdir():
        try:
            owner = entry.read_text().strip()
            age = now - entry.stat().st_mtime
        except FileNotFoundError:  # a teardown (not under the pool lock) removed it meanwhile
            continue
        if age < RESERVATION_GRACE or Path("/sys/class/net", owner).exists():
            reserved.add(ipaddress.IPv4Network(f"{entry.name}/30"))
    return reserved


def _free_subnet(pool: ipaddress.IPv4Network) -> ipaddress.IPv4Network:
    used = _used_networks() | _reserved_networks()
    # Machines' /30s are looked up, the few other networks compared: one pass, not pool x used.
    taken = {u for u in used if u.prefixlen == 30}
    others = [u for u in used if u.prefixlen != 30]
    for subnet in pool.subnets(new_prefix=30):
        if subnet not in taken and not any(subnet.overlaps(u) for u in others):
            return subnet
    raise MachineError(
        f"no free /30 left in the machine network pool {pool}", reason="NetworkFailed"
    )


def _forward_rules(link: Link, ports: list[PortForward]) -> str:
    """DNAT from the host's loopback to the machine; the source becomes the host's link
    address, so replies come back over the link (as established traffic)."""
    if not ports:
        return ""
    host_ip = link.host_address.split("/")[0]
    dnat = "\n    ".join(
        f"ip daddr 127.0.0.1 {p.protocol} dport {p.host_port} dnat ip to {link.address}:{p.port}"
        for p in ports
    )
    return f"""
  chain nat_output {{
    type nat hook output priority -100; policy accept;
    {dnat}
  }}
  chain nat_postrouting {{
    type nat hook postrouting priority 100; policy accept;
    oifname "{link.host_ifname}" ip saddr 127.0.0.1 snat ip to {host_ip}
  }}"""


def _check_ports_free(ports: list[PortForward]) -> None:
    """Refuse a host port another machine forwards or a host process listens on."""
    if not ports:
        return
    ruleset = _run(["nft", "list", "ruleset"], "cannot list nftables rules")
    for p in ports:
        kind = socket.SOCK_STREAM if p.protocol == "tcp" else socket.SOCK_DGRAM
        taken = f"{p.protocol} dport {p.host_port} dnat" in ruleset
        with socket.socket(socket.AF_INET, kind) as probe:
            try:
                probe.bind(("127.0.0.1", p.host_port))
            except OSError:
                taken = True
        if taken:
            raise MachineError(
                f"host port {p.host_port}/{p.protocol} is already in use", reason="PortInUse"
            )


def _nft_rules(link: Link, allow_host: bool, ports: list[PortForward]) -> str:
    ifname, table = link.host_ifname, _table(link.host_ifname)
    host_ip = link.host_address.split("/")[0]
    host_rule = f'iifname "{ifname}" ip daddr {host_ip} accept' if allow_host else ""
    return f"""
table inet {table} {{
  chain input {{
    type filter hook input priority -10; policy accept;
    iifname "{ifname}" ct state established,related accept
    {host_rule}
    iifname "{ifname}" drop
  }}
  chain forward {{
    type filter hook forward priority -10; policy accept;
    iifname "{ifname}" drop
    oifname "{ifname}" drop
  }}{_forward_rules(link, ports)}
}}
"""


def prepare_link(
    scope: str, name: str, spec: NetworkSpec, pool: ipaddress.IPv4Network = DEFAULT_POOL
) -> Link:
    """Allocate the link's /30 and install its filter, before nspawn creates the veth pair.

    (nspawn creates the pair itself, `--network-veth-extra`: it refuses to move in a link that
    udev has not seen, and a namespace made outside its user namespace cannot be joined.)
    The filter matches the interface by name, so it is in force from the link's first packet.
    """
    ifname = link_name(scope, name)
    teardown_link(scope, name)
    with _pool_lock():
        subnet = _free_subnet(pool)
        host_ip, machine_ip = (str(h) for h in list(subnet.hosts())[:2])
        link = Link(ifname, MACHINE_IFNAME, f"{host_ip}/30", f"{machine_ip}/30")
        _check_ports_free(spec.ports)
        # The reservation holds the subnet until the host side carries the address; it lives
        # as long as the link's filter table (a stale one is dropped by the next allocation).
        RESERVATIONS.mkdir(parents=True, exist_ok=True)
        (RESERVATIONS / str(subnet.network_address)).write_text(ifname)
        rules = _nft_rules(link, spec.allow_host, spec.ports)
        try:
            _run(["nft", "-f", "-"], "cannot install the link filter", stdin=rules)
        except MachineError:
            teardown_link(scope, name)
            raise
    return link


def configure_host_side(link: Link) -> None:
    """Address and raise the host's end of the link."""
    host = link.host_ifname
    set_sysctl(f"net.ipv6.conf.{host}.disable_ipv6", "1")
    # route_localnet: forwarded ports send loopback-sourced packets (SNATed) over this link
    set_sysctl(f"net.ipv4.conf.{host}.route_localnet", "1")
    _run(
        ["ip", "-batch", "-"],
        "cannot configure the machine's link",
        f"addr add {link.host_address} dev {host}\nlink set {host} up\n",
    )


def create_tap(link: Link) -> None:
    """A VM's link: a persistent tap of the shim's own name (so networkd leaves it alone, as it
    does the veths), which qemu attaches to; removed by teardown_link like a veth."""
    _run(
        ["ip", "tuntap", "add", "dev", link.host_ifname, "mode", "tap"],
        "cannot create the VM's tap link",
    )
    configure_host_side(link)


def configure_link(link: Link, leader_pid: int) -> None:
    """Address and raise both ends once the machine runs (its end from outside, via nsenter)."""
    what = "cannot configure the machine's link"
    inside = link.machine_ifname
    configure_host_side(link)
    set_sysctl("net.ipv6.conf.all.disable_ipv6", "1", netns_of=leader_pid)
    enter = ["nsenter", "-t", str(leader_pid), "--net"]
    commands = (
        f"link set lo up\naddr add {link.machine_address} dev {inside}\nlink set {inside} up\n"
    )
    _run([*enter, "ip", "-batch", "-"], what, commands)


def _reservations_of(ifname: str) -> list[Path]:
    found = []
    if RESERVATIONS.is_dir():
        for entry in RESERVATIONS.iterdir():
            with contextlib.suppress(FileNotFoundError):
                if entry.read_text().strip() == ifname:
                    found.append(entry)
    return found


def teardown_link(scope: str, name: str) -> None:
    """Remove the filter and the host side of the link (the peer goes with it); missing is fine.

    Everything is derived from the names, so this works without the run record too."""
    ifname = link_name(scope, name)
    reservations = _reservations_of(ifname)
    # The table is made after the reservation and the reservation removed after the table, so
    # without one there is no table to delete (nft takes most of a second to say so at 400).
    if reservations:
        _quiet(["nft", "delete", "table", "inet", _table(ifname)])
    if Path("/sys/class/net", ifname).exists():
        _quiet(["ip", "link", "del", ifname])
    for entry in reservations:
        entry.unlink(missing_ok=True)
