"""The host's capability report: each tool and kernel feature the shim uses, probed.

Every entry says whether it is there, its version, and for every "no" the reason and what
would fix it. `runtime_refusal` turns the report into the reason a runtime cannot run here,
so `--check` and the shim's refusal of a Tenant say the same thing.
"""

from __future__ import annotations

import functools
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from bitbuilder.hostshim.api import Runtime
from bitbuilder.hostshim.capabilities import kvm

NEEDED_CONTROLLERS = ("cpu", "memory", "pids")
VIRTIOFSD_PLACES = ("/usr/libexec/virtiofsd", "/usr/lib/virtiofsd", "/usr/lib/qemu/virtiofsd")
FIRMWARE_DIRS = ("/usr/share/qemu/firmware", "/etc/qemu/firmware")
NETWORKD_PLACES = ("/usr/lib/systemd/systemd-networkd", "/lib/systemd/systemd-networkd")
_VERSION = re.compile(r"(\d+(?:\.\d+)*)")


class Capability(BaseModel):
    model_config = ConfigDict(frozen=True)

    name: str
    available: bool
    version: str | None = None
    detail: str | None = Field(None, description="What was found (path, controllers, backend).")
    reason: str | None = Field(None, description="Why not, for every unavailable entry.")
    fix: str | None = Field(None, description="The package or setting that would make it work.")


class HostReport(BaseModel):
    model_config = ConfigDict(frozen=True)

    pid1_systemd: bool
    capabilities: list[Capability]
    runtimes: dict[str, str | None] = Field(
        description="runtime -> None when this host runs it, else the reason it cannot."
    )
    acceleration: str | None = Field(description="kvm or tcg for VMs; None without VMs.")

    def get(self, name: str) -> Capability:
        return next(c for c in self.capabilities if c.name == name)

    @property
    def containers_ok(self) -> bool:
        return self.runtimes[Runtime.nspawn.value] is None

    def text(self) -> str:
        lines = [f"PID 1 is systemd: {'yes' if self.pid1_systemd else 'no'}"]
        for cap in self.capabilities:
            mark = "yes" if cap.available else "no "
            version = f" {cap.version}" if cap.version else ""
            lines.append(f"{mark} {cap.name}{version}" + (f" ({cap.detail})" if cap.detail else ""))
            if not cap.available:
                lines.append(f"      why: {cap.reason}")
                if cap.fix:
                    lines.append(f"      fix: {cap.fix}")
        for runtime, refusal in self.runtimes.items():
            lines.append(
                f"runtime {runtime}: "
                + ("can run" if refusal is None else f"cannot run: {refusal}")
            )
        lines.append(f"VM acceleration: {self.acceleration or 'none'}")
        return "\n".join(lines)

    def json_text(self) -> str:
        return json.dumps(self.model_dump(mode="json"), indent=2)


def _version_of(argv: list[str]) -> str | None:
    """The first version number the tool prints, or None when it does not run."""
    try:
        result = subprocess.run(argv, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if result.returncode != 0:
        return None
    match = _VERSION.search(result.stdout + result.stderr)
    return match.group(1) if match else "unknown"


def _tool(name: str, binary: str, fix: str, flag: str = "--version") -> Capability:
    path = shutil.which(binary)
    if path is None:
        return Capability(name=name, available=False, reason=f"{binary} is not installed", fix=fix)
    version = _version_of([path, flag])
    if version is None:
        return Capability(
            name=name, available=False, detail=path, reason=f"{path} {flag} failed", fix=fix
        )
    return Capability(name=name, available=True, version=version, detail=path)


def _first_file(places: tuple[str, ...]) -> str | None:
    return next((p for p in places if os.access(p, os.X_OK)), None)


def _virtiofsd() -> Capability:
    fix = "apt-get install virtiofsd"
    path = shutil.which("virtiofsd") or _first_file(VIRTIOFSD_PLACES)
    if path is None:
        return Capability(
            name="virtiofsd", available=False, reason="virtiofsd is not installed", fix=fix
        )
    return Capability(
        name="virtiofsd", available=True, version=_version_of([path, "--version"]), detail=path
    )


def _tcg(qemu: Capability) -> Capability:
    if not qemu.available:
        return Capability(
            name="tcg", available=False, reason="no qemu-system-x86_64 to emulate with",
            fix="apt-get install qemu-system-x86",
        )  # fmt: skip
    assert qemu.detail is not None
    result = subprocess.run(
        [qemu.detail, "-accel", "help"], capture_output=True, text=True, timeout=10
    )
    if "tcg" not in result.stdout.split():
        return Capability(name="tcg", available=False, reason="this qemu has no TCG accelerator")
    return Capability(
        name="tcg", available=True, version=qemu.version, detail="qemu software emulation"
    )


def _kvm() -> Capability:
    found = kvm.probe()
    if found.usable:
        return Capability(name="kvm", available=True, detail=f"backend {found.backend}")
    return Capability(
        name="kvm",
        available=False,
        detail=f"backend {found.backend}" if found.backend else None,
        reason=found.reason,
        fix="a host with hardware virtualisation (VT-x/AMD-V) and kvm_intel or kvm_amd loaded; VMs use TCG meanwhile",
    )


def _firmware() -> Capability:
    descriptors = sorted(
        str(p) for d in FIRMWARE_DIRS if Path(d).is_dir() for p in Path(d).glob("*.json")
    )
    if not descriptors:
        return Capability(
            name="firmware", available=False,
            reason="no UEFI firmware descriptors (VMs boot their kernel directly)",
            fix="apt-get install ovmf",
        )  # fmt: skip
    return Capability(name="firmware", available=True, detail=f"{len(descriptors)} descriptors")


def _networkd() -> Capability:
    path = _first_file(NETWORKD_PLACES)
    if path is None:
        return Capability(
            name="networkd", available=False, reason="systemd-networkd is not installed",
            fix="apt-get install systemd (networkd ships with it from Debian 13; systemd-networkd before)",
        )  # fmt: skip
    return Capability(
        name="networkd", available=True, version=_version_of([path, "--version"]), detail=path
    )


def _importctl(pid1_systemd: bool) -> Capability:
    cap = _tool("importctl", "importctl", "apt-get install systemd-container (systemd >= 256)")
    if cap.available and not pid1_systemd:
        return cap.model_copy(
            update={"available": False, "reason": "PID 1 is not systemd: importctl needs systemd-importd",
                    "fix": "run the shim on a host booted with systemd; images are imported by the shim itself meanwhile"}
        )  # fmt: skip
    return cap


def _user_namespaces() -> Capability:
    """What the kernel allows (nspawn's --private-users=pick needs it), not what this process
    may do: the shim's own unit forbids it user namespaces, the machines it starts are not."""
    fix = "sysctl user.max_user_namespaces=15000 (and a kernel with CONFIG_USER_NS)"
    try:
        limit = int(Path("/proc/sys/user/max_user_namespaces").read_text())
    except (OSError, ValueError):
        return Capability(
            name="user-namespaces",
            available=False,
            reason="the kernel has no user namespaces",
            fix=fix,
        )
    if limit == 0:
        return Capability(
            name="user-namespaces", available=False, reason="user.max_user_namespaces is 0", fix=fix
        )
    return Capability(name="user-namespaces", available=True, detail=f"max {limit}")


def cgroup2_root(mountinfo: str) -> Path | None:
    """Where the cgroup2 hierarchy is mounted (the first one /proc/self/mountinfo lists)."""
    for line in mountinfo.splitlines():
        left, _, right = line.partition(" - ")
        if right.split(" ", 1)[0] == "cgroup2":
            return Path(left.split()[4])
    return None


def _cgroup2() -> Capability:
    root = cgroup2_root(Path("/proc/self/mountinfo").read_text())
    fix = "boot with systemd.unified_cgroup_hierarchy=1 (cgroup2 only), so cpu, memory and pids are on cgroup2"
    if root is None:
        return Capability(
            name="cgroup2", available=False, reason="no cgroup2 hierarchy is mounted", fix=fix
        )
    controllers = (root / "cgroup.controllers").read_text().split()
    missing = [c for c in NEEDED_CONTROLLERS if c not in controllers]
    detail = f"{root}: {' '.join(controllers) or 'no controllers'}"
    if missing:
        return Capability(
            name="cgroup2", available=False, detail=detail, fix=fix,
            reason=f"the cgroup2 hierarchy lacks the {', '.join(missing)} controllers (limits go through cgroup v1 where it has them)",
        )  # fmt: skip
    return Capability(name="cgroup2", available=True, detail=detail)


def _vmspawn_refusal(caps: dict[str, Capability]) -> str | None:
    for need in ("vmspawn", "qemu", "virtiofsd"):
        if not caps[need].available:
            return f"{need}: {caps[need].reason} (fix: {caps[need].fix})"
    if not caps["kvm"].available and not caps["tcg"].available:
        return f"neither KVM ({caps['kvm'].reason}) nor TCG ({caps['tcg'].reason})"
    return None


def probe_host() -> HostReport:
    pid1_systemd = Path("/run/systemd/system").is_dir()
    qemu = _tool("qemu", "qemu-system-x86_64", "apt-get install qemu-system-x86")
    found = [
        _tool("nspawn", "systemd-nspawn", "apt-get install systemd-container"),
        _tool("vmspawn", "systemd-vmspawn", "systemd >= 256 with systemd-vmspawn (Debian forky's systemd-container)"),
        qemu,
        _kvm(),
        _tcg(qemu),
        _virtiofsd(),
        _firmware(),
        _tool("sysext", "systemd-sysext", "apt-get install systemd"),
        _tool("confext", "systemd-confext", "systemd >= 254 (Debian 13)"),
        _networkd(),
        _importctl(pid1_systemd),
        _user_namespaces(),
        _cgroup2(),
    ]  # fmt: skip
    caps = {c.name: c for c in found}
    nspawn_refusal = None
    for need in ("nspawn", "user-namespaces"):
        if not caps[need].available:
            nspawn_refusal = f"{need}: {caps[need].reason} (fix: {caps[need].fix})"
            break
    vm_refusal = _vmspawn_refusal(caps)
    acceleration = None if vm_refusal else ("kvm" if caps["kvm"].available else "tcg")
    return HostReport(
        pid1_systemd=pid1_systemd,
        capabilities=found,
        runtimes={Runtime.nspawn.value: nspawn_refusal, Runtime.vmspawn.value: vm_refusal},
        acceleration=acceleration,
    )


@functools.cache
def host_report() -> HostReport:
    """The report, probed once per process (the tools do not change under a running shim)."""
    return probe_host()


def runtime_refusal(runtime: Runtime) -> str | None:
    """Why this host cannot run `runtime`, or None."""
    return host_report().runtimes[runtime.value]
