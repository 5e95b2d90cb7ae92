"""Which cgroup files carry a machine's limits: cgroup2 first, the v1 controllers otherwise.

The real hierarchies of this machine are hybrid (the container tests enforce limits through
v1); here fake hierarchies under tmp_path show the unified-only layout real hosts have.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from bitbuilder.hostshim.api import ResourceLimits
from bitbuilder.hostshim.errors import HostError, MachineError
from bitbuilder.hostshim.machine import cgroups

LIMITS = ResourceLimits(cpu_millis=250, memory_bytes=64 * 2**20, tasks=32)


def fake_hierarchy(root: Path, controllers: str) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "cgroup.procs").write_text("")
    (root / "cgroup.controllers").write_text(controllers)
    return root


def test_unified_host_gets_every_limit_in_one_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake_hierarchy(tmp_path, "cpuset cpu io memory hugetlb pids\n")
    monkeypatch.setattr(cgroups, "CGROUP_ROOT", tmp_path)
    made = cgroups.create_cgroups("scope1", "web", LIMITS)
    d = tmp_path / "bitbuilder-scope1" / "web"
    assert made.unified == d and made.v1 == ()
    assert (d / "memory.max").read_text() == str(64 * 2**20)
    assert (d / "cpu.max").read_text() == "25000 100000"
    assert (d / "pids.max").read_text() == "32"
    assert (tmp_path / "cgroup.subtree_control").read_text() in ("+memory", "+cpu", "+pids")


def test_hybrid_host_puts_limits_into_v1_controllers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake_hierarchy(tmp_path / "unified", "hugetlb\n")
    for controller in ("memory", "cpu", "pids"):
        (tmp_path / controller).mkdir()
        (tmp_path / controller / "cgroup.procs").write_text("")
    monkeypatch.setattr(cgroups, "CGROUP_ROOT", tmp_path)
    made = cgroups.create_cgroups("scope1", "web", LIMITS)
    assert made.unified == tmp_path / "unified/bitbuilder-scope1/web"
    assert not (made.unified / "memory.max").exists()
    files = {p.name: p.read_text() for d in made.v1 for p in d.iterdir()}
    assert files == {
        "memory.limit_in_bytes": str(64 * 2**20),
        "cpu.cfs_period_us": "100000",
        "cpu.cfs_quota_us": "25000",
        "pids.max": "32",
    }


def test_a_limit_without_its_controller_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake_hierarchy(tmp_path, "cpu memory\n")
    monkeypatch.setattr(cgroups, "CGROUP_ROOT", tmp_path)
    with pytest.raises(MachineError) as refused:
        cgroups.create_cgroups("scope1", "web", LIMITS)
    assert refused.value.reason == "LimitUnsupported" and "pids" in refused.value.message
    assert isinstance(refused.value, HostError), "the host's setting, said as such"
    assert "drop that limit from the spec's resources" in refused.value.message
    assert not (tmp_path / "bitbuilder-scope1" / "web").exists(), "nothing half-made is left"
    assert cgroups.create_cgroups("scope1", "ok", ResourceLimits(cpu_millis=100)).unified.is_dir()


def test_a_machine_without_a_tasks_limit_gets_the_hosts_default(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake_hierarchy(tmp_path, "cpu memory pids\n")
    monkeypatch.setattr(cgroups, "CGROUP_ROOT", tmp_path)
    made = cgroups.create_cgroups("scope1", "web", ResourceLimits())
    assert (made.unified / "pids.max").read_text() == str(cgroups.DEFAULT_TASKS)
    assert not (made.unified / "memory.max").exists(), "memory: only if the shim sets a default"
    fake_hierarchy(tmp_path / "no-pids", "cpu memory\n")
    monkeypatch.setattr(cgroups, "CGROUP_ROOT", tmp_path / "no-pids")
    made = cgroups.create_cgroups("scope1", "web", ResourceLimits())
    assert not (made.unified / "pids.max").exists(), "no pids controller: no default, no error"


def test_a_machine_without_a_memory_limit_gets_the_shims_default(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake_hierarchy(tmp_path, "cpu memory pids\n")
    monkeypatch.setattr(cgroups, "CGROUP_ROOT", tmp_path)
    made = cgroups.create_cgroups("scope1", "web", ResourceLimits(), default_memory=256 << 20)
    assert (made.unified / "memory.max").read_text() == str(256 << 20)
    own = cgroups.create_cgroups("scope1", "own", LIMITS, default_memory=256 << 20)
    assert (own.unified / "memory.max").read_text() == str(64 << 20), "the spec's wins"
    fake_hierarchy(tmp_path / "no-memory", "cpu pids\n")
    monkeypatch.setattr(cgroups, "CGROUP_ROOT", tmp_path / "no-memory")
    made = cgroups.create_cgroups("scope1", "web", ResourceLimits(), default_memory=256 << 20)
    assert not (made.unified / "memory.max").exists(), "no controller: no default, no error"
