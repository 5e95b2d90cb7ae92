"""systemd-networkd and the tenant links: the shim owns them, networkd keeps its hands off.

Each tenant's host-side veth is created, addressed (a /30 from the shim's pool) and filtered
(nftables: nothing between tenants, the host only when the spec allows) by hostshim/machine/network.py,
identically on every host. What networkd must not do is take such a link over: a catch-all
.network on the host (`Name=*` with DHCP, common on servers) would otherwise flush the shim's
addresses and run a DHCP client towards the tenant. So the shim installs one .network file,
ordered before the usual ones, that matches exactly the names the shim gives its links and
marks them unmanaged; `networkctl` then lists them as such.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

NETWORK_DIR = Path("/etc/systemd/network")
NETWORK_FILE = "10-bitbuilder-tenant-links.network"


# The shape of network.link_name(): "bb" and 11 lower-case hex digits (a test keeps them in step).
LINK_PATTERN = "bb" + "[0-9a-f]" * 11


def render() -> str:
    return (
        "# Installed by bitbuilder-hostshim-install: tenant links belong to the host shim,\n"
        "# which addresses and filters them itself. networkd must not manage them.\n"
        "[Match]\n"
        f"Name={LINK_PATTERN}\n"
        "\n"
        "[Link]\n"
        "Unmanaged=yes\n"
    )


def install(network_dir: Path = NETWORK_DIR) -> Path:
    path = network_dir / NETWORK_FILE
    network_dir.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(render())
    tmp.chmod(0o644)
    tmp.replace(path)
    return path


def reload() -> None:
    """Make a running networkd read the file now (no-op when networkd is not running)."""
    subprocess.run(["networkctl", "reload"], capture_output=True, timeout=30, check=False)
