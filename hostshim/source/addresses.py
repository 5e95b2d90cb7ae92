"""Which hosts a tenant's source URL may name: never the host itself (SSRF).

A tenant picks its repository URL, and the shim fetches as root from the host's own network
position: an URL naming loopback, a link-local address (cloud metadata services live at
169.254.169.254), an address of one of the host's interfaces, or the machines' link pool would
let a tenant make the host talk to services only the host can reach. Those are refused unless
the shim's configuration allows the network (tests and the demo serve repos on loopback).

Known gaps: the name is resolved here and again by libgit2 when it connects, so a DNS answer
that changes in between (rebinding) passes; and libgit2 follows an http(s) redirect of the
first request (pygit2 offers no switch), so a server the check allowed may send the fetch on.
"""

from __future__ import annotations

import contextlib
import ipaddress
import socket
from collections.abc import Iterable
from urllib.parse import urlsplit

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


def url_host(url: str) -> str | None:
    """The host an URL (or scp-like `user@host:path`) names; None for file:// and local paths."""
    if "://" in url:
        parts = urlsplit(url)
        return None if parts.scheme == "file" else parts.hostname
    if ":" in url.split("/", 1)[0]:
        return url.split(":", 1)[0].rpartition("@")[2].strip("[]") or None
    return None


def _is_local(address: IPAddress) -> bool:
    """Does an interface of this host carry `address`? (Only then may a socket bind to it.)"""
    family = socket.AF_INET6 if address.version == 6 else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as probe:
        try:
            probe.bind((str(address), 0))
        except OSError:
            return False
    return True


def host_local_reason(address: IPAddress, machine_pool: IPNetwork) -> str | None:
    """Why `address` reaches the host itself, or None if it does not."""
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    if address.is_loopback:
        return "a loopback address"
    if address.is_link_local:
        return "a link-local address"
    if address.is_unspecified or address.is_multicast:
        return "not a unicast address"
    if address in machine_pool:
        return "an address of the machines' links"
    if _is_local(address):
        return "an address of this host"
    return None


def resolve(host: str) -> list[IPAddress]:
    """Every address `host` resolves to (none if it does not resolve: the fetch reports that)."""
    with contextlib.suppress(ipaddress.AddressValueError, ValueError):
        return [ipaddress.ip_address(host)]
    try:
        infos = socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)
    except (socket.gaierror, UnicodeError):
        return []
    return [ipaddress.ip_address(str(info[4][0]).split("%")[0]) for info in infos]


def refusal(url: str, allowed: Iterable[IPNetwork], machine_pool: IPNetwork) -> str | None:
    """Why the shim must not fetch `url` (the host it names is the host itself), or None."""
    host = url_host(url)
    if host is None:
        return None
    allowed = list(allowed)
    for address in resolve(host):
        if any(address in network for network in allowed if network.version == address.version):
            continue
        why = host_local_reason(address, machine_pool)
        if why is not None:
            return (
                f"{url}: {host} is {why} ({address}): a tenant source must not reach the host's "
                f"own services. If this is meant, allow that network on the shim "
                f"(--allow-source-network {ipaddress.ip_network(address)})"
            )
    return None
