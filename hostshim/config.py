"""The shim's configuration: every filesystem root is configurable so tests run under a temp dir."""

from __future__ import annotations

import ipaddress
import os
from dataclasses import dataclass, field
from pathlib import Path

DEFAULT_STATE_DIR = Path("/var/lib/bitbuilder")
DEFAULT_RUNTIME_DIR = Path("/run/bitbuilder")
DEFAULT_SOCKET = DEFAULT_RUNTIME_DIR / "hostshim.sock"


@dataclass(frozen=True)
class ShimConfig:
    state_dir: Path = DEFAULT_STATE_DIR
    runtime_dir: Path = DEFAULT_RUNTIME_DIR
    socket_path: Path = DEFAULT_SOCKET
    # Peers allowed on the socket (SO_PEERCRED); root only unless widened.
    allowed_uids: frozenset[int] = frozenset({0})
    allowed_gids: frozenset[int] = frozenset()
    # Where `PUT /v1/images/{name}` may take a directory or file:// tarball from.
    trusted_image_paths: tuple[Path, ...] = ()
    # OpenPGP public key files whose signature on SHA256SUMS an image with verify: signature needs.
    trusted_image_keys: tuple[Path, ...] = ()
    # file:// tenant repos are only allowed under these roots (none by default: a tenant must
    # not read the host's own repositories).
    file_source_roots: tuple[Path, ...] = ()
    # Networks a tenant source URL may resolve into although they reach the host itself
    # (loopback, link-local, the host's own addresses, the machine links): none by default.
    source_networks: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()
    # The memory limit of a machine whose spec sets none (None: unlimited); one tenant must not
    # take the host's memory by leaving its limit out.
    default_memory_bytes: int | None = 1 << 30
    # The size of a tenant's writable layer (a loop-mounted image) where its spec sets no
    # resources.diskBytes; None: no quota for new layers. Sparse: a limit, not a reservation.
    tenant_disk_bytes: int | None = 8 << 30
    # Host ports a port forward may take (inclusive): host services keep theirs. The default is
    # Kubernetes' NodePort range, which hosts already keep free for exactly this.
    host_port_range: tuple[int, int] = (30000, 32767)
    # "auto" picks systemd when PID 1 is systemd, else the direct executor.
    executor: str = "auto"
    node_name: str = field(default_factory=lambda: os.uname().nodename)
    max_body_bytes: int = 1 << 20
    # Host-local addresses for machine links: one /30 per isolated machine, never routed.
    machine_network_pool: str = "10.250.0.0/16"
