"""`bitbuilder-hostshim --check` against what this machine really has, found independently."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from bitbuilder.hostshim.api import MachineSpec, Runtime
from bitbuilder.hostshim.capabilities import kvm
from bitbuilder.hostshim.capabilities.report import cgroup2_root, runtime_refusal
from bitbuilder.hostshim.errors import MachineError
from bitbuilder.hostshim.machine.runner import check_spec

CHECK = [sys.executable, "-m", "bitbuilder.hostshim.main", "--check"]


def run_check(*extra: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CHECK, *extra], capture_output=True, text=True, timeout=60, env=env)


@pytest.fixture(scope="module")
def report() -> dict[str, Any]:
    result = run_check("-o", "json")
    assert result.returncode == (0 if shutil.which("systemd-nspawn") else 1), result.stderr
    data: dict[str, Any] = json.loads(result.stdout)
    return data


def cap(report: dict[str, Any], name: str) -> dict[str, Any]:
    found: dict[str, Any] = next(c for c in report["capabilities"] if c["name"] == name)
    return found


def systemd_version(binary: str) -> str | None:
    path = shutil.which(binary)
    if path is None:
        return None
    return subprocess.run([path, "--version"], capture_output=True, text=True).stdout.split()[1]


def test_nspawn_and_vmspawn_are_what_is_installed(report: dict[str, Any]) -> None:
    nspawn, vmspawn = cap(report, "nspawn"), cap(report, "vmspawn")
    assert nspawn["available"] == (systemd_version("systemd-nspawn") is not None)
    assert nspawn["version"] == systemd_version("systemd-nspawn")
    installed = systemd_version("systemd-vmspawn")
    assert vmspawn["available"] == (installed is not None)
    if installed is None:  # Debian 12 (systemd 252): no vmspawn, and the report says how to get it
        assert "not installed" in vmspawn["reason"] and "256" in vmspawn["fix"]
        assert report["runtimes"]["vmspawn"].startswith("vmspawn: ")
        assert report["acceleration"] is None
    assert report["runtimes"]["nspawn"] is None


def hardware_kvm() -> bool:
    return Path("/dev/kvm").exists() and any(
        Path("/sys/module", m).is_dir() for m in ("kvm_intel", "kvm_amd")
    )


def test_kvm_is_reported_usable_only_with_hardware_virtualisation(report: dict[str, Any]) -> None:
    entry = cap(report, "kvm")
    assert entry["available"] == hardware_kvm()
    if Path("/sys/module/kvm_pvm").is_dir() and not hardware_kvm():  # these CI machines
        assert entry["detail"] == "backend kvm_pvm"
        assert "PVM" in entry["reason"] and "stock kernel" in entry["reason"]
    if not Path("/dev/kvm").exists():
        assert "does not exist" in entry["reason"]


@pytest.mark.skipif(not Path("/dev/kvm").exists(), reason="no /dev/kvm on this machine")
def test_the_kvm_probe_really_runs_a_vcpu() -> None:
    """The verdict comes from a vCPU that ran, not from a probe that broke on the way."""
    assert kvm.run_vcpu() is None


def test_cgroup2_controllers_are_the_mounted_ones(report: dict[str, Any]) -> None:
    root = cgroup2_root(Path("/proc/self/mountinfo").read_text())
    assert root is not None
    controllers = (root / "cgroup.controllers").read_text().split()
    entry = cap(report, "cgroup2")
    assert entry["available"] == all(c in controllers for c in ("cpu", "memory", "pids"))
    assert entry["detail"].startswith(str(root))


def test_pid1_and_importctl(report: dict[str, Any]) -> None:
    pid1 = Path("/proc/1/comm").read_text().strip() == "systemd"
    assert report["pid1_systemd"] == pid1
    importctl = cap(report, "importctl")
    assert importctl["available"] == (pid1 and shutil.which("importctl") is not None)


def test_every_no_has_a_reason_and_the_text_shows_it(report: dict[str, Any]) -> None:
    text = run_check().stdout
    for entry in report["capabilities"]:
        if not entry["available"]:
            assert entry["reason"], entry
            assert f"no  {entry['name']}" in text and f"why: {entry['reason']}" in text


def test_exit_status_is_not_zero_when_containers_cannot_run(tmp_path: Path) -> None:
    env = {**os.environ, "PATH": str(tmp_path)}  # no systemd-nspawn on it
    result = run_check("-o", "json", env=env)
    assert result.returncode == 1
    assert json.loads(result.stdout)["runtimes"]["nspawn"].startswith("nspawn: ")


@pytest.mark.skipif(runtime_refusal(Runtime.vmspawn) is None, reason="this host runs VMs")
def test_a_vmspawn_spec_is_refused_with_the_probes_reason() -> None:
    spec = MachineSpec.model_validate({"name": "vm", "image": "base", "runtime": "vmspawn"})
    with pytest.raises(MachineError) as caught:
        check_spec(spec)
    assert caught.value.reason == "Unsupported"
    refusal = runtime_refusal(Runtime.vmspawn)
    assert refusal is not None and refusal in caught.value.message
