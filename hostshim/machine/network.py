"""A machine's network link: a veth pair from the host to the machine's own namespace.

nspawn creates the machine's network namespace (inside its user namespace) and moves the
runner's veth peer into it; the runner names, addresses and raises it from outside, so the
machine needs no DHCP client. Each link gets a /30 from the host-local pool: the host side is
.1, the machine .2.

One nftables table, `inet bitbuilder`, shared by every machine (and every shim) on the host,
drops everything a machine sends to the host (except replies, and the host's own address on
its link when allow_host is set) and every packet forwarded from or to a machine's link, so
no two tenant links are ever routed together and a machine reaches nothing beyond its link.
Its base chains look the packet's interface up in sets with one element per machine: a hash
lookup however many machines run (a table per machine put every packet through two base
chains per machine). (Root inside the machine may re-address its end; the filter keys on the
interface, not the address, so that gains it nothing.) Port forwards are elements of a DNAT
map from the host's loopback to the machine's address. A start adds its elements and a stop
removes them, each in one `nft -f` transaction (a start's also declares the table and its
rules, so they are there, and current, whatever happened to the table before). What a stop
removes is read from the table, not from a record a crash may have lost; a link made by a
shim from before the shared table loses its own table `inet bitbuilder_<link>` then too.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import ipaddress
import json
import logging
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bitbuilder.hostshim.api import NetworkSpec, PortForward
from bitbuilder.hostshim.errors import HostError, MachineError
from bitbuilder.hostshim.timing import phase

log = logging.getLogger(__name__)

DEFAULT_POOL = ipaddress.IPv4Network("10.250.0.0/16")
# The pool is shared by every shim on the host (tests run several), so allocation is locked
# host-wide and checked against the addresses actually configured.
POOL_LOCK = Path("/run/lock/bitbuilder-netpool.lock")
RESERVATIONS = Path("/run/lock/bitbuilder-netpool.d")
# Each link's subnet by link name (`<ifname>` holding the subnet): a teardown finds its
# reservation without reading every one. Apart from RESERVATIONS, which older shims read whole.
LINKS = Path("/run/lock/bitbuilder-netpool.links")
MACHINE_IFNAME = "host0"
RESERVATION_GRACE = 300.0  # s; far longer than prepare_link -> configure_link in any start
POOL_LOCK_TIMEOUT = 30.0  # s; the lock is held for a directory scan and a file write
TABLE = "inet bitbuilder"


# The Debian package of each tool the network needs, for the error that says to install it.
_PACKAGES = {"nft": "nftables", "ip": "iproute2", "nsenter": "util-linux"}
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


def _sysctl_refused(key: str, problem: str) -> HostError:
    return HostError(
        f"cannot set {key}: {problem}: /proc/sys is not writable where the shim runs (a "
        "container that shares the host's network gets it read-only): run the shim on the "
        "host, or in a container with a writable /proc/sys/net",
        reason="SysctlDenied",
    )


def set_sysctl(key: str, value: str) -> None:
    """sysctl `key`=`value` on the host, written directly (no sysctl process per key).

    A /proc/sys the shim cannot write (a container sharing the host's network has it
    read-only) is the host's set-up, said as such. An IPv6 key of a kernel without IPv6 needs
    no setting: there is nothing to disable."""
    path = Path("/proc/sys", key.replace(".", "/"))
    try:
        path.write_text(value)
    except FileNotFoundError:
        if key.startswith("net.ipv6."):
            return
        raise MachineError(f"cannot set {key}: no such setting", reason="NetworkFailed") from None
    except OSError as exc:
        if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
            raise _sysctl_refused(key, exc.strerror or str(exc)) from None
        raise MachineError(f"cannot set {key}: {exc}", reason="NetworkFailed") from None


# Run inside the machine's network namespace (nsenter --net: /proc/sys/net is that namespace's
# there): IPv6 off where the kernel has it, then the `ip` commands on stdin. One process.
_INSIDE = (
    "k=/proc/sys/net/ipv6/conf/all/disable_ipv6; "
    '[ ! -e "$k" ] || echo 1 > "$k" || { echo "$k not writable" >&2; exit 1; }; '
    "exec ip -batch -"
)


def configure_inside(link: Link, leader_pid: int) -> None:
    """IPv6 off, loopback up, the machine's end addressed and up: from outside, in one go."""
    commands = (
        f"link set lo up\naddr add {link.machine_address} dev {link.machine_ifname}\n"
        f"link set {link.machine_ifname} up\n"
    )
    enter = ["nsenter", "-t", str(leader_pid), "--net", "sh", "-c", _INSIDE]
    try:
        _run(enter, "cannot configure the machine's link", commands)
    except MachineError as exc:
        if "disable_ipv6 not writable" in exc.message:
            raise _sysctl_refused("net.ipv6.conf.all.disable_ipv6", "read-only") from exc
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


def link_name(scope: str, name: str) -> str:
    """A host interface name (<= 15 chars) unique per shim scope and machine."""
    return "bb" + hashlib.sha256(f"{scope}/{name}".encode()).hexdigest()[:11]


def _legacy_table(ifname: str) -> str:
    """The table a shim before the shared table made per link."""
    return f"inet bitbuilder_{ifname}"


@contextmanager
def _pool_lock() -> Iterator[None]:
    """Host-wide (every shim allocates from the same pool); a holder that hangs is an error
    here after POOL_LOCK_TIMEOUT, not a start that waits for ever."""
    POOL_LOCK.parent.mkdir(parents=True, exist_ok=True)
    with POOL_LOCK.open("a") as f:
        deadline = time.monotonic() + POOL_LOCK_TIMEOUT
        while True:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise MachineError(
                        f"the machine network pool is locked ({POOL_LOCK}) for more than "
                        f"{POOL_LOCK_TIMEOUT:.0f}s by another process: see `fuser {POOL_LOCK}`",
                        reason="NetworkPoolBusy",
                    ) from None
                time.sleep(0.005)  # flock has no timeout; held for milliseconds at a time
        yield


def _used_networks() -> set[ipaddress.IPv4Network]:
    """The networks the host routes (its addresses' prefixes and routed networks; not the
    default route): a machine's subnet must not shadow one. Read from /proc/net/route (this
    network namespace's main table): no process, and cheap with hundreds of links."""
    used = set()
    for line in Path("/proc/net/route").read_text().splitlines()[1:]:
        fields = line.split()
        destination, mask = (
            ipaddress.IPv4Address(bytes.fromhex(f)[::-1]) for f in (fields[1], fields[7])
        )
        if int(mask):
            used.add(ipaddress.IPv4Network(f"{destination}/{mask}", strict=False))
    return used


@dataclass(frozen=True)
class _Reservation:
    """A subnet held for a link: a file under RESERVATIONS named by the subnet, holding the
    link's name (as shims before the shared table wrote them: each reads the other's)."""

    path: Path
    subnet: ipaddress.IPv4Network
    ifname: str

    @classmethod
    def read(cls, path: Path) -> _Reservation | None:
        try:
            return cls(path, ipaddress.IPv4Network(f"{path.name}/30"), path.read_text().strip())
        except (FileNotFoundError, ValueError):  # removed meanwhile; not a reservation
            return None

    def stale(self, now: float) -> bool:
        """Left by a crash: no link, and older than any start takes to make one."""
        if Path("/sys/class/net", self.ifname).exists():
            return False
        try:
            return now - self.path.stat().st_mtime >= RESERVATION_GRACE
        except FileNotFoundError:  # a teardown removed it meanwhile
            return False


def _reservations() -> list[_Reservation]:
    if not RESERVATIONS.is_dir():
        return []
    return [r for r in map(_Reservation.read, RESERVATIONS.iterdir()) if r is not None]


def _reserved_subnets() -> set[int]:
    """Subnets held for a link (their addresses as numbers): by the reservations' names alone,
    no file read per link."""
    reserved = set()
    with contextlib.suppress(FileNotFoundError):
        for path in RESERVATIONS.iterdir():
            with contextlib.suppress(ValueError):  # not a reservation
                reserved.add(int(ipaddress.IPv4Address(path.name)))
    return reserved


def _sweep_stale() -> None:
    """Clear the reservations a crash left (no link, older than any start takes), their filter
    elements and tables first: a port forward to such an address must not reach the next
    holder of it. Under the pool lock: at shim start, and when the pool is full."""
    now = time.time()
    for reservation in _reservations():
        if reservation.stale(now):
            log.warning("clearing link %s's reservation left by a crash", reservation.ifname)
            _remove_filter(reservation.ifname)
            (LINKS / reservation.ifname).unlink(missing_ok=True)
            reservation.path.unlink(missing_ok=True)


def sweep_stale_reservations() -> None:
    with _pool_lock():
        _sweep_stale()


def _free_subnet(
    pool: ipaddress.IPv4Network, used: set[ipaddress.IPv4Network]
) -> ipaddress.IPv4Network | None:
    """The first /30 of the pool neither reserved nor overlapping a network in `used`.
    Reserved ones are looked up as numbers, the few other networks compared: one pass."""
    taken = _reserved_subnets() | {int(u.network_address) for u in used if u.prefixlen == 30}
    others = [u for u in used if u.prefixlen != 30]
    for address in range(int(pool.network_address), int(pool.broadcast_address), 4):
        if address not in taken:
            subnet = ipaddress.IPv4Network((address, 30))
            if not any(subnet.overlaps(u) for u in others):
                return subnet
    return None


def _check_ports_unbound(ports: list[PortForward]) -> None:
    """Refuse a host port a host process listens on (another machine's forward of it is
    refused by nft: the DNAT map's element is created, never replaced)."""
    for p in ports:
        kind = socket.SOCK_STREAM if p.protocol == "tcp" else socket.SOCK_DGRAM
        with socket.socket(socket.AF_INET, kind) as probe:
            try:
                probe.bind(("127.0.0.1", p.host_port))
            except OSError:
                raise _port_in_use([p]) from None


def _port_in_use(ports: list[PortForward]) -> MachineError:
    shown = ", ".join(f"{p.host_port}/{p.protocol}" for p in ports)
    return MachineError(f"host port {shown} is already in use", reason="PortInUse")


# The shared table: declared (idempotently) and its rules rewritten in every transaction.
_BASE = f"""add table {TABLE}
add set {TABLE} links {{ type ifname; }}
add set {TABLE} host_ok {{ type ifname . ipv4_addr; }}
add map {TABLE} forwards {{ type inet_proto . inet_service : ipv4_addr . inet_service; }}
add map {TABLE} masq {{ type ifname : ipv4_addr; }}
add chain {TABLE} input {{ type filter hook input priority -10; policy accept; }}
add chain {TABLE} forward {{ type filter hook forward priority -10; policy accept; }}
add chain {TABLE} nat_output {{ type nat hook output priority -100; policy accept; }}
add chain {TABLE} nat_postrouting {{ type nat hook postrouting priority 100; policy accept; }}
flush chain {TABLE} input
add rule {TABLE} input iifname @links ct state established,related accept
add rule {TABLE} input iifname . ip daddr @host_ok accept
add rule {TABLE} input iifname @links drop
flush chain {TABLE} forward
add rule {TABLE} forward iifname @links drop
add rule {TABLE} forward oifname @links drop
flush chain {TABLE} nat_output
add rule {TABLE} nat_output ip daddr 127.0.0.1 dnat ip to meta l4proto . th dport map @forwards
flush chain {TABLE} nat_postrouting
add rule {TABLE} nat_postrouting ip saddr 127.0.0.1 snat ip to oifname map @masq
"""


def install_table() -> None:
    """Declare the shared table and write its rules as this shim has them: at shim start (and by
    a start that finds the table missing). Not in every start's transaction: declaring sets
    makes nft read every element first (12 ms at 500 machines; adding one alone takes 3)."""
    _run(["nft", "-f", "-"], "cannot install the machines' filter table", _BASE)


def _add_elements(lines: str) -> None:
    what = "cannot install the link filter"
    try:
        _run(["nft", "-f", "-"], what, lines)
    except MachineError as exc:
        if "No such file or directory" not in exc.message:
            raise
        _run(["nft", "-f", "-"], what, _BASE + lines)  # no table yet (or it was deleted)


def _filter_elements(link: Link, allow_host: bool, ports: list[PortForward]) -> str:
    """The link's elements. Forwards DNAT from the host's loopback to the machine; the source
    becomes the host's link address (masq), so replies come back over the link (as
    established traffic). A forward is created, never replaced: a port another machine
    forwards fails the whole transaction."""
    ifname, host_ip = link.host_ifname, link.host_address.split("/")[0]
    lines = [f'add element {TABLE} links {{ "{ifname}" }}']
    if allow_host:
        lines.append(f'add element {TABLE} host_ok {{ "{ifname}" . {host_ip} }}')
    if ports:
        lines.append(f'add element {TABLE} masq {{ "{ifname}" : {host_ip} }}')
    lines += [
        f"create element {TABLE} forwards {{ {p.protocol} . {p.host_port} : "
        f"{link.address} . {p.port} }}"
        for p in ports
    ]
    return "\n".join(lines) + "\n"


def _listed_table() -> list[dict[str, Any]]:
    """The shared table's sets and maps as `nft -j` lists them; none if it does not exist."""
    try:
        listing = _run(["nft", "-j", "list", "table", *TABLE.split()], "cannot list nftables")
    except MachineError as exc:
        if "No such file or directory" in exc.message:
            return []
        raise
    entries: list[dict[str, Any]] = json.loads(listing).get("nftables", [])
    return [entry[kind] for entry in entries for kind in ("set", "map") if kind in entry]


def _parts(item: Any) -> list[Any]:
    """A listed key or value: a concatenation's parts, or the one part."""
    return list(item["concat"]) if isinstance(item, dict) and "concat" in item else [item]


def _shared_entries(ifname: str) -> list[str]:
    """The link's elements in the shared table, as `delete element` lines: those keyed by its
    name, and the forwards to its machine (the address its masq element names, plus one)."""
    listed = _listed_table()
    machine_ips = {
        str(ipaddress.IPv4Address(element[1]) + 1)
        for found in listed if found["name"] == "masq"
        for element in found.get("elem", []) if element[0] == ifname
    }  # fmt: skip
    lines = []
    for found in listed:
        for element in found.get("elem", []):
            if found["name"] == "forwards":
                key = _parts(element[0])
                if str(_parts(element[1])[0]) not in machine_ips:
                    continue
                shown = f"{key[0]} . {key[1]}"
            else:
                key = _parts(element[0] if isinstance(element, list) else element)
                if key[0] != ifname:
                    continue
                shown = " . ".join([f'"{ifname}"', *map(str, key[1:])])
            lines.append(f"delete element {TABLE} {found['name']} {{ {shown} }}")
    return lines


def filter_entries(ifname: str) -> list[str]:
    """What nftables holds for the link `ifname`: its elements in the shared table and its
    table from before that. Empty once its machine has stopped (the tests' check)."""
    tables = _run(["nft", "list", "tables"], "cannot list nftables tables").splitlines()
    legacy = [f"table {_legacy_table(ifname)}"]
    return _shared_entries(ifname) + [line for line in tables if line == legacy[0]]


def _remove_filter(ifname: str) -> None:
    """Remove the link's elements and the table a shim before the shared table made for it
    (created and deleted: gone whether it was there or not, without listing tables), in one
    transaction."""
    table = _legacy_table(ifname)
    lines = [*_shared_entries(ifname), f"add table {table}", f"delete table {table}"]
    _run(["nft", "-f", "-"], "cannot remove the link filter", "\n".join(lines) + "\n")


def prepare_link(
    scope: str, name: str, spec: NetworkSpec, pool: ipaddress.IPv4Network = DEFAULT_POOL
) -> Link:
    """Allocate the link's /30 and install its filter, before nspawn creates the veth pair.

    (nspawn creates the pair itself, `--network-veth-extra`: it refuses to move in a link that
    udev has not seen, and a namespace made outside its user namespace cannot be joined.)
    The filter matches the interface by name, so it is in force from the link's first packet.
    Only the subnet's reservation is made under the host-wide pool lock; the host's other
    networks are listed before it, the filter installed after it (an nft transaction is
    atomic by itself).
    """
    ifname = link_name(scope, name)
    with phase(name, "network: teardown before"):
        teardown_link(scope, name)
    _check_ports_unbound(spec.ports)
    used = _used_networks()  # the machines' own subnets are all reserved: read under the lock
    with phase(name, "network: pool lock, reserve"), _pool_lock(), phase(name, "network: reserve"):
        subnet = _free_subnet(pool, used)
        if subnet is None:
            _sweep_stale()
            subnet = _free_subnet(pool, used)
        if subnet is None:
            raise MachineError(
                f"no free /30 left in the machine network pool {pool}", reason="NetworkFailed"
            )
        # Held until the teardown has removed the link and its filter elements; the index
        # first, so a reservation always has one (an index alone is dropped by the teardown).
        for folder in (LINKS, RESERVATIONS):
            folder.mkdir(parents=True, exist_ok=True)
        (LINKS / ifname).write_text(str(subnet.network_address))
        (RESERVATIONS / str(subnet.network_address)).write_text(ifname)
    host_ip, machine_ip = (str(h) for h in list(subnet.hosts())[:2])
    link = Link(ifname, MACHINE_IFNAME, f"{host_ip}/30", f"{machine_ip}/30")
    try:
        with phase(name, "network: nft"):
            _add_elements(_filter_elements(link, spec.allow_host, spec.ports))
    except MachineError as exc:
        teardown_link(scope, name)
        if spec.ports and "File exists" in exc.message:
            raise _port_in_use(spec.ports) from exc
        raise
    except HostError:
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
    configure_host_side(link)
    configure_inside(link, leader_pid)


def _reservations_of(ifname: str) -> list[_Reservation]:
    """The link's reservation, by its index; a link an older shim made (it has no index) by
    reading them all. Without either, the link has no reservation (a leftover of an older
    shim's crash is swept at the next shim start)."""
    try:
        address = (LINKS / ifname).read_text().strip()
    except FileNotFoundError:
        if not Path("/sys/class/net", ifname).exists():
            return []
        return [r for r in _reservations() if r.ifname == ifname]
    found = _Reservation.read(RESERVATIONS / address) if address else None
    return [found] if found is not None and found.ifname == ifname else []


def teardown_link(scope: str, name: str) -> None:
    """Remove the filter and the host side of the link (the peer goes with it); missing is fine.

    Everything is derived from the names, so this works without the run record too. Filter
    elements are added after the reservation and the reservation removed after them, so
    without one there is nothing in nftables to remove (no listing at a machine's first start).
    A kernel without nftables (or no nft) has nothing installed either."""
    ifname = link_name(scope, name)
    reservations = _reservations_of(ifname)
    if reservations:
        with contextlib.suppress(HostError):
            _remove_filter(ifname)
    if Path("/sys/class/net", ifname).exists():
        _quiet(["ip", "link", "del", ifname])
    for reservation in reservations:
        reservation.path.unlink(missing_ok=True)
    (LINKS / ifname).unlink(missing_ok=True)
