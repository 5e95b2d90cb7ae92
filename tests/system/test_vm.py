"""The booted forky test host (systemd 262 with vmspawn, qemu, virtiofsd): the capability
report there finds vmspawn and, with KVM unusable (PVM here) or absent, picks TCG."""

from __future__ import annotations

import json
import sys
from typing import Any

from tests.system.testhost import TestHost


def check_report(host: TestHost) -> dict[str, Any]:
    result = host.run(sys.executable, "-m", "bitbuilder.hostshim.main", "--check", "-o", "json")
    report: dict[str, Any] = json.loads(result.stdout)
    return report


def test_check_in_forky_finds_vmspawn_and_picks_tcg(forky: TestHost) -> None:
    report = check_report(forky)
    caps = {c["name"]: c for c in report["capabilities"]}
    systemd = forky.enter("systemctl", "--version").stdout.split()[1]
    assert caps["vmspawn"]["available"] and caps["vmspawn"]["version"] == systemd
    assert int(systemd) >= 256
    for tool in ("qemu", "tcg", "virtiofsd", "importctl", "confext"):
        assert caps[tool]["available"], caps[tool]
    assert report["runtimes"] == {"nspawn": None, "vmspawn": None}
    # KVM here is PVM (or absent): unusable for a stock kernel, so VMs use TCG.
    assert not caps["kvm"]["available"]
    assert report["acceleration"] == "tcg"
