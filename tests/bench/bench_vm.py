"""VM start: a vmspawn tenant's PUT -> Running beside a bare systemd-vmspawn boot of the same
image with the same flags, in one booted forky test host (TCG here; KVM where the probe finds it).

    python -m tests.bench.bench_vm [--rounds 1]

Needs what the system tests need (root, debootstrap, nspawn, zstd; the cached forky test host and
guest image are built on first use). "Running" is the same for both: the guest answers ping on
its address (its kernel, udev and networkd are up). The bare boot runs vmspawn_argv's command
line (one CPU, 512 MiB) on the image directory itself, as a transient unit, with a tap and a
networkd file for its address written into its copy of the image; the tenant gets the shim's
overlay root, guest layer, tap and filter. Prints each boot and the ratio of the medians.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from bitbuilder.hostshim.api import ResourceLimits
from bitbuilder.hostshim.machine.network import Link
from bitbuilder.hostshim.machine.runtime.vmspawn import (
    VmspawnMachine,
    guest_kernel,
    vmspawn_argv,
    vmspawn_env,
)
from bitbuilder.hostshim.machine.vm import NETWORK_FILE, guest_layer
from tests.helpers.wait import wait_for
from tests.shim.harness import ShimClient
from tests.system.shimapi import SOCKET, install_shim, start_shim
from tests.system.testhost import (
    FORKY,
    GUEST,
    TestHost,
    ensure_tarball,
    restore_tree,
    restored_root,
)

# The shim's pool is 10.250.0.0/16; the bare VM's link is outside it (and named like the
# shim's links, so networkd leaves it alone).
BARE_LINK = Link("bb0000000000b", "host0", "10.251.0.1/30", "10.251.0.2/30")
BARE_UNIT = "bb-bench-bare-vm.service"
TIMEOUT = 1500.0


def answers(host: TestHost, address: str) -> bool:
    return host.enter("ping", "-c", "1", "-W", "1", address, check=False).returncode == 0


def bare_boot(host: TestHost, image: Path) -> float:
    """Seconds from starting a bare systemd-vmspawn of `image` to its guest answering ping."""
    network = image / NETWORK_FILE
    network.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(guest_layer(image.parent / "bare-layer", None, BARE_LINK) / NETWORK_FILE, network)
    machine = VmspawnMachine(
        name="bench-bare",
        directory=image,
        raw=None,
        boot=guest_kernel(image),
        kvm=False,
        tap=BARE_LINK.host_ifname,
        resources=ResourceLimits(),
    )
    tap, host_address = BARE_LINK.host_ifname, BARE_LINK.host_address
    host.enter("ip", "tuntap", "add", "dev", tap, "mode", "tap")
    host.enter("ip", "addr", "add", host_address, "dev", tap)
    host.enter("ip", "link", "set", tap, "up")
    env = [f"--setenv={key}={value}" for key, value in vmspawn_env(machine).items()]
    try:
        began = time.monotonic()
        host.enter(
            "systemd-run", f"--unit={BARE_UNIT}", "--property=Type=exec", *env,
            *vmspawn_argv(machine),
        )  # fmt: skip
        wait_for(
            lambda: answers(host, BARE_LINK.address), timeout=TIMEOUT, interval=0.5,
            what="the bare VM's ping",
        )  # fmt: skip
        return time.monotonic() - began
    finally:
        host.enter("systemctl", "stop", BARE_UNIT, check=False, timeout=120)
        host.enter("ip", "link", "del", tap, check=False)


def tenant_boot(host: TestHost, name: str) -> float:
    """Seconds from the tenant's PUT to its reply, Running (the shim waits for the ping)."""
    client = ShimClient(f"/proc/{host.leader}/root{SOCKET}", timeout=TIMEOUT)
    spec = {"name": name, "runtime": "vmspawn", "image": "guest"}
    began = time.monotonic()
    reply = client.request("PUT", f"/v1/machines/{name}", spec)
    elapsed = time.monotonic() - began
    assert reply.status == 200 and reply.body["phase"] == "Running", reply.body
    client.request("DELETE", f"/v1/machines/{name}")
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=1)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-vm-", dir="/var/tmp") as tmp:
        shared = Path(tmp)
        shared.chmod(0o755)
        images = shared / "images"
        restore_tree(ensure_tarball(flavour=GUEST), images / "guest")
        devices = [Path("/dev/net/tun")]
        with (
            restored_root(flavour=FORKY) as root,
            TestHost(root, binds_rw=[shared, *devices]) as host,
        ):
            install_shim(host, shared, images)
            start_shim(host)
            client = ShimClient(f"/proc/{host.leader}/root{SOCKET}", timeout=TIMEOUT)
            reply = client.request("PUT", "/v1/images/guest", {"path": str(images / "guest")})
            assert reply.status == 200, reply.body
            tenant = [tenant_boot(host, f"bench-vm-{i}") for i in range(args.rounds)]
            # After the import: the network file goes into this copy only, not the shim's.
            bare = [bare_boot(host, images / "guest") for _ in range(args.rounds)]
    for label, values in (("bare systemd-vmspawn: answers ping", bare),
                          ("tenant PUT -> Running (answers ping)", tenant)):  # fmt: skip
        print(
            f"{label:<40} median {statistics.median(values):7.1f} s   "
            f"min {min(values):7.1f}   max {max(values):7.1f}   (n={len(values)})"
        )
    print(
        f"ratio tenant / bare (medians): {statistics.median(tenant) / statistics.median(bare):.2f}"
    )


if __name__ == "__main__":
    main()
