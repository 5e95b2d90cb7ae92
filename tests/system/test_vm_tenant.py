"""A VM tenant (runtime: vmspawn) end to end, inside the booted forky test host, under TCG.

The shim runs as its service there; the guest image is a cached forky directory tree (built
once, like the test host); one container tenant stands beside the VM for the isolation checks.
VM boots are slow under TCG (minutes), so one VM is booted and shared by the tests that only
read it; the tests run in file order and the update, revert and delete come last.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from bitbuilder.hostshim.images.busybox import build_busybox_rootfs
from tests.helpers.gitserve import git
from tests.helpers.wait import wait_for
from tests.shim.harness import ShimClient
from tests.system.shimapi import SOCKET, install_shim, ok, shim_active, start_shim
from tests.system.testhost import GUEST, TestHost, ensure_tarball, restore_tree

pytestmark = pytest.mark.timeout(3600)

VM, CONTAINER = "vm1", "ct1"
HTTP_PORT, HOST_PORT = 8080, 30080
STATE = Path("/var/lib/bitbuilder/tenants")
# A TCG boot is 80-140 s on an idle machine; the shim answers the PUT once the VM pings.
BOOT_TIMEOUT = 1200.0

# The provisioning unit: records that it ran (with the revision's marker), serves the
# revision's page, and probes what the test says the VM must not reach.
PROVISION_UNIT = """[Unit]
Description=BitBuilder test provisioning
After=network-online.target

[Service]
Type=simple
ExecStartPre=/bin/sh -c 'mkdir -p /var/lib/bb && cat /etc/bb/marker > /var/lib/bb/provisioned'
ExecStart=/bin/busybox httpd -f -p {port} -h /etc/bb/www

[Install]
WantedBy=multi-user.target
"""
PROVISIONED = "Started bb-provision.service"
PROBE_UNIT = """[Unit]
Description=BitBuilder test probe: what this VM can reach

[Service]
Type=oneshot
ExecStart=/bin/sh /etc/bb/probe.sh

[Install]
WantedBy=multi-user.target
"""
# Each target once the link is up: "reached" or "unreachable" per address.
PROBE_SCRIPT = """set -u
own=
for i in $(seq 120); do
  own=$(ip -o -4 addr show scope global | awk '{print $4}' | cut -d/ -f1 | head -n1)
  [ -n "$own" ] && break
  sleep 1
done
host_side=${own%.*}.$(( ${own##*.} - 1 ))
out=/var/lib/bb/probe
mkdir -p /var/lib/bb
: > $out.tmp
for target in $(cat /etc/bb/targets) $host_side; do
  if /bin/busybox ping -c 2 -W 2 $target > /dev/null 2>&1; then r=reached; else r=unreachable; fi
  echo "$target $r" >> $out.tmp
done
mv $out.tmp $out
"""


@dataclass
class VmDeployment:
    host: TestHost
    repos: Path

    def call(self, method: str, path: str, body: object = None) -> Any:
        client = ShimClient(f"/proc/{self.host.leader}/root{SOCKET}", timeout=BOOT_TIMEOUT)
        reply = client.request(method, path, body)
        assert reply.status == 200, f"{method} {path} -> {reply.status}: {reply.body}"
        return reply.body

    def status(self, name: str) -> Any:
        return ok(self.host, "GET", f"/v1/machines/{name}")

    def guest_file(self, rel: str) -> str:
        """A file the guest wrote: its writable layer is the overlay's upper dir on the host."""
        path = STATE / VM / "data" / "upper" / rel
        return self.host.enter("cat", str(path), check=False).stdout

    def console(self) -> str:
        log = f"/run/bitbuilder/machines/{VM}/console.log"
        return self.host.enter("tail", "-c", "6000", log, check=False).stdout

    def diagnose(self) -> str:
        """What the network looked like: printed when a VM check fails."""
        parts = []
        for argv in (
            ("networkctl", "list", "--no-legend"),
            ("ip", "-br", "addr"),
            ("nft", "list", "ruleset"),
            ("systemctl", "status", "--no-pager", f"bitbuilder-tenant-{VM}.service"),
        ):
            result = self.host.enter(*argv, check=False)
            parts.append(f"$ {' '.join(argv)}\n{result.stdout}{result.stderr}")
        parts.append(f"--- guest console (tail)\n{self.console()}")
        return "\n".join(parts)


def commit(repo: Path, marker: str, targets: list[str]) -> str:
    """A VM tenant revision: the units, a confext tree with the marker, page and targets."""
    files = {
        "units/bb-provision.service": PROVISION_UNIT.format(port=HTTP_PORT),
        "units/bb-probe.service": PROBE_UNIT,
        "confext/bb/etc/bb/marker": f"{marker}\n",
        "confext/bb/etc/bb/www/index.html": f"page {marker}\n",
        "confext/bb/etc/bb/targets": "".join(f"{t}\n" for t in targets),
        "confext/bb/etc/bb/probe.sh": PROBE_SCRIPT,
    }
    for rel, text in files.items():
        (repo / rel).parent.mkdir(parents=True, exist_ok=True)
        (repo / rel).write_text(text)
    git("add", "-A", cwd=repo)
    git("commit", "-q", "-m", marker, cwd=repo)
    return git("rev-parse", "HEAD", cwd=repo)


def vm_spec(repos: Path) -> dict[str, object]:
    return {
        "name": VM,
        "runtime": "vmspawn",
        "image": "guest",
        "source": {"url": f"file://{repos / VM}", "ref": {"branch": "main"}},
        "resources": {"memoryBytes": 768 * 2**20, "cpuMillis": 1000},
        "network": {
            "mode": "isolated",
            "allowHost": False,
            "ports": [{"port": HTTP_PORT, "hostPort": HOST_PORT}],
        },
    }


def container_spec(repos: Path) -> dict[str, object]:
    return {
        "name": CONTAINER,
        "image": "busybox",
        "source": {"url": f"file://{repos / CONTAINER}", "ref": {"branch": "main"}},
        "network": {"mode": "isolated", "allowHost": False},
    }


@pytest.fixture(scope="module")
def deployment(forky: TestHost, shared_dir: Path) -> Iterator[VmDeployment]:
    # Its own folder in the session's shared one: test_tenants builds its images there too.
    images, repos = shared_dir / "vm" / "images", shared_dir / "vm" / "repos"
    images.mkdir(parents=True)
    restore_tree(ensure_tarball(flavour=GUEST), images / "guest")
    build_busybox_rootfs(images / "busybox")
    for name in (VM, CONTAINER):
        (repos / name).mkdir(parents=True)
        git("init", "-q", "-b", "main", cwd=repos / name)
    (repos / CONTAINER / "README").write_text("container\n")
    git("add", "-A", cwd=repos / CONTAINER)
    git("commit", "-q", "-m", "c1", cwd=repos / CONTAINER)
    install_shim(forky, repos, images)
    start_shim(forky)
    deployment = VmDeployment(forky, repos)
    for image in ("guest", "busybox"):
        deployment.call("PUT", f"/v1/images/{image}", {"path": str(images / image)})
    container = deployment.call("PUT", f"/v1/machines/{CONTAINER}", container_spec(repos))
    assert container["phase"] == "Running", container
    commit(repos / VM, "r1", [container["address"], container_host_side(container["address"])])
    try:
        status = deployment.call("PUT", f"/v1/machines/{VM}", vm_spec(repos))
        assert status["phase"] == "Running", (status, deployment.diagnose())
        yield deployment
    finally:
        for name in (VM, CONTAINER):
            ShimClient(f"/proc/{forky.leader}/root{SOCKET}", timeout=300).request(
                "DELETE", f"/v1/machines/{name}"
            )


def container_host_side(address: str) -> str:
    head, last = address.rsplit(".", 1)
    return f"{head}.{int(last) - 1}"


def ping_from_host(deployment: VmDeployment, address: str) -> bool:
    result = deployment.host.enter("ping", "-c", "1", "-W", "2", address, check=False)
    return result.returncode == 0


def in_container(
    deployment: VmDeployment, *argv: str, check: bool = True
) -> subprocess.CompletedProcess[str]:
    leader = deployment.host.enter(
        "machinectl", "show", "-p", "Leader", "--value", CONTAINER
    ).stdout.strip()
    return deployment.host.enter("nsenter", "-t", leader, "-m", "-n", *argv, check=check)


def test_vm_runs_under_tcg_and_answers_on_its_address(deployment: VmDeployment) -> None:
    status = deployment.status(VM)
    assert status["phase"] == "Running"
    assert status["runtime"] == "vmspawn"
    assert status["acceleration"] == "tcg"
    assert status["address"] and ping_from_host(deployment, status["address"]), (
        deployment.diagnose()
    )
    # The VM's tap is the shim's (networkd leaves it alone); vmspawn made no vt-* link.
    links = deployment.host.enter("networkctl", "list", "--no-legend").stdout
    taps = [line.split() for line in links.splitlines() if line.split()[1].startswith("bb")]
    assert taps and all(fields[-1] == "unmanaged" for fields in taps), links
    assert " vt-" not in links, links


def test_provisioning_unit_ran_inside_the_vm(deployment: VmDeployment) -> None:
    found = wait_for(
        lambda: deployment.guest_file("var/lib/bb/provisioned"), timeout=120, what="provisioned"
    )
    assert found == "r1\n"


def test_port_forward_reaches_the_vms_service(deployment: VmDeployment) -> None:
    def page() -> str:
        result = deployment.host.enter(
            "busybox", "wget", "-q", "-T", "3", "-O", "-", f"http://127.0.0.1:{HOST_PORT}/",
            check=False,
        )  # fmt: skip
        return result.stdout

    assert wait_for(page, timeout=120, what="the forwarded page") == "page r1\n"


def test_vm_and_container_cannot_reach_each_other_or_the_host(
    deployment: VmDeployment,
) -> None:
    vm = deployment.status(VM)["address"]
    container = deployment.status(CONTAINER)["address"]
    probe = wait_for(
        lambda: deployment.guest_file("var/lib/bb/probe"), timeout=180, what="the VM's probe"
    )
    results = dict(line.split() for line in probe.splitlines())
    assert results == {
        container: "unreachable",
        container_host_side(container): "unreachable",
        container_host_side(vm): "unreachable",
    }, probe
    for target in (vm, container_host_side(vm)):
        reply = in_container(
            deployment, "/bin/busybox", "ping", "-c", "1", "-W", "2", target, check=False
        )
        assert reply.returncode != 0, f"the container reached {target}"


def test_shim_restart_adopts_the_running_vm(deployment: VmDeployment) -> None:
    host, before = deployment.host, deployment.status(VM)
    host.enter("systemctl", "stop", "bitbuilder-hostshim.service")
    assert not shim_active(host)
    unit = host.enter("systemctl", "is-active", f"bitbuilder-tenant-{VM}.service", check=False)
    assert unit.stdout.strip() == "active"
    # The socket stays with systemd: the next request starts the shim, which adopts the VM.
    after = deployment.status(VM)
    assert after["phase"] == "Running"
    for key in ("leaderPid", "address", "startedAt", "acceleration", "appliedRevision"):
        assert after[key] == before[key], key


def guest_journal(deployment: VmDeployment) -> str:
    journal = STATE / VM / "data" / "upper" / "var" / "log" / "journal"
    return deployment.host.enter(
        "journalctl", f"--directory={journal}", "--no-pager", "-o", "cat", check=False
    ).stdout


def put_and_serve(deployment: VmDeployment, marker: str, commit_id: str) -> None:
    status = deployment.call("PUT", f"/v1/machines/{VM}", vm_spec(deployment.repos))
    assert status["phase"] == "Running", (status, deployment.diagnose())
    assert status["appliedRevision"] == commit_id
    assert (
        wait_for(
            lambda: deployment.guest_file("var/lib/bb/provisioned") == f"{marker}\n",
            timeout=180,
            what=f"provisioning of {marker}",
        )
        is True
    )
    page = deployment.host.enter(
        "busybox", "wget", "-q", "-T", "5", "-O", "-", f"http://127.0.0.1:{HOST_PORT}/",
        check=False,
    ).stdout  # fmt: skip
    assert page == f"page {marker}\n"


def test_update_from_git_and_revert_each_run_the_new_tree(deployment: VmDeployment) -> None:
    repo = deployment.repos / VM
    targets = (repo / "confext/bb/etc/bb/targets").read_text().split()
    r2 = commit(repo, "r2", targets)
    put_and_serve(deployment, "r2", r2)
    # The r1 VM was powered off cleanly: its ACPI button reached the guest's logind.
    assert "Power key pressed" in guest_journal(deployment), deployment.console()
    git("revert", "--no-edit", "HEAD", cwd=repo)
    reverted = git("rev-parse", "HEAD", cwd=repo)
    put_and_serve(deployment, "r1", reverted)


def recorded_address(host: TestHost) -> str | None:
    """The VM's address from its run record (no shim to ask)."""
    record = host.enter("cat", f"/run/bitbuilder/machines/{VM}/machine.json", check=False)
    if record.returncode != 0:
        return None
    link = json.loads(record.stdout).get("link") or {}
    return str(link["machineAddress"]).split("/")[0] if link else None


def test_reboot_brings_the_vm_back_from_persisted_state(deployment: VmDeployment) -> None:
    host, applied = deployment.host, deployment.status(VM)["appliedRevision"]
    provisioned = guest_journal(deployment).count(PROVISIONED)
    # No control plane, no shim, no tenant repo: only the generator and setup-tenant@.
    host.enter(
        "systemctl", "disable", "--now", "bitbuilder-hostshim.socket", "bitbuilder-hostshim.service"
    )  # fmt: skip
    repo, offline = deployment.repos / VM, deployment.repos / f"{VM}.offline"
    repo.rename(offline)
    try:
        host.reboot()
        unit = f"setup-tenant@{VM}.service"
        assert host.enter("systemctl", "is-active", unit).stdout.strip() == "active"
        address = wait_for(lambda: recorded_address(host), timeout=60, what="the VM's record")
        wait_for(
            lambda: ping_from_host(deployment, address), timeout=BOOT_TIMEOUT, interval=2,
            what="the restored VM's ping",
        )  # fmt: skip
        assert not shim_active(host)
    finally:
        offline.rename(repo)
    # The provisioning unit ran once more, in the restored VM, at the last applied revision.
    wait_for(
        lambda: guest_journal(deployment).count(PROVISIONED) > provisioned, timeout=180,
        what="provisioning in the restored VM",
    )  # fmt: skip
    assert deployment.guest_file("var/lib/bb/provisioned") == "r1\n"
    host.enter("systemctl", "enable", "bitbuilder-hostshim.socket", "bitbuilder-hostshim.service")
    start_shim(host)
    status = deployment.status(VM)
    assert status["phase"] == "Running" and status["appliedRevision"] == applied
    assert status["address"] == address


def test_delete_leaves_nothing_behind(deployment: VmDeployment) -> None:
    host = deployment.host
    assert deployment.status(VM)["phase"] == "Running"
    [tap] = [line.split()[0] for line in bb_links(host) if "@" not in line.split()[0]]
    deployment.call("DELETE", f"/v1/machines/{VM}")
    processes = host.enter("ps", "-eo", "comm=", check=False).stdout.split()
    for name in ("qemu-system-x86", "virtiofsd", "systemd-vmspawn"):
        assert name not in processes, processes
    [veth] = bb_links(host)  # the container's only
    assert "@" in veth, veth
    # The shared filter table names the container's link, no longer the VM's tap.
    table = host.enter("nft", "list", "table", "inet", "bitbuilder").stdout
    assert f'"{veth.split("@")[0]}"' in table and f'"{tap}"' not in table, table
    assert f"/run/bitbuilder/machines/{VM}" not in host.enter("cat", "/proc/self/mountinfo").stdout
    for path in (f"/run/bitbuilder/machines/{VM}", str(STATE / VM)):
        assert host.enter("test", "-e", path, check=False).returncode == 1, path
    unit = host.enter("systemctl", "is-active", f"bitbuilder-tenant-{VM}.service", check=False)
    assert unit.stdout.strip() != "active"
    assert call_status(host, VM) == 404


def bb_links(host: TestHost) -> list[str]:
    """The shim's links in the test host, as `ip -br link` shows them."""
    lines = host.enter("ip", "-br", "link").stdout.splitlines()
    return [line for line in lines if line.startswith("bb")]


def call_status(host: TestHost, name: str) -> int:
    return (
        ShimClient(f"/proc/{host.leader}/root{SOCKET}", timeout=60)
        .request("GET", f"/v1/machines/{name}")
        .status
    )
