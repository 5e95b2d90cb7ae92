"""`bitbuilder-hostshim --check` inside the booted test host, against what that host has."""

from __future__ import annotations

import json
import sys
from typing import Any

from tests.system.testhost import TestHost


def test_check_reports_the_test_hosts_tools(testhost: TestHost) -> None:
    result = testhost.run(sys.executable, "-m", "bitbuilder.hostshim.main", "--check", "-o", "json")
    report = json.loads(result.stdout)
    caps: dict[str, dict[str, Any]] = {c["name"]: c for c in report["capabilities"]}
    assert report["pid1_systemd"] is True
    systemd = testhost.enter("systemctl", "--version").stdout.split()[1]
    assert caps["nspawn"]["available"] and caps["nspawn"]["version"] == systemd

    def has(path: str) -> bool:
        return testhost.enter("test", "-x", path, check=False).returncode == 0

    assert caps["vmspawn"]["available"] == has("/usr/bin/systemd-vmspawn")
    assert caps["importctl"]["available"] == has("/usr/bin/importctl")  # PID 1 is systemd here
    assert caps["confext"]["available"] == has("/usr/bin/systemd-confext")
    assert caps["networkd"]["available"]
    kvm_node = testhost.enter("test", "-e", "/dev/kvm", check=False).returncode == 0
    if not kvm_node:
        assert not caps["kvm"]["available"] and "does not exist" in caps["kvm"]["reason"]
    if not caps["vmspawn"]["available"]:  # trixie: systemd 257 without vmspawn
        assert report["runtimes"]["vmspawn"].startswith("vmspawn: ")
    assert report["runtimes"]["nspawn"] is None
