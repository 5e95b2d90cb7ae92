"""A tenant exhausting what it is given: its disk, memory and processes. Each attempt fails
inside the tenant's own limits, the host's state disk keeps its space, and the neighbour keeps
running (and writing, allocating and forking).

The limits here are the shim's defaults for a spec that sets none (tight ones, so exhausting
them is quick): the default memory limit and tasks limit, and the tenant disk size.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from bitbuilder.hostshim.machine import cgroups
from bitbuilder.hostshim.paths import TenantPaths
from tests.hostile.conftest import TIGHT_DISK, TIGHT_MEMORY
from tests.runner.conftest import Shim, needs_nspawn

pytestmark = [pytest.mark.nspawn, pytest.mark.hostile, needs_nspawn]


def cgroup_file(shim: Shim, name: str, *candidates: str) -> Path:
    """The first of `candidates` in the machine's cgroup dirs (v2 or v1 names)."""
    made = shim.executor.cgroups(name)
    assert made is not None
    for d in made.dirs:
        for candidate in candidates:
            if (d / candidate).exists():
                return d / candidate
    pytest.skip(f"no {candidates} on this host")


def neighbour_is_fine(shim: Shim, name: str) -> None:
    neighbour = shim.runner.inspect(name)
    assert neighbour is not None, "the neighbour keeps running"
    writes = shim.run_in(neighbour, "sh", "-c", "echo fine > /root/fine && cat /root/fine")
    assert writes.stdout == "fine\n", writes.stderr


def test_filling_its_disk_stops_at_its_quota(tight_shim: Shim) -> None:
    neighbour = tight_shim.start()
    hog = tight_shim.start()
    fill = tight_shim.run_in(
        hog, "dd", "if=/dev/zero", "of=/root/fill", "bs=1M", "count=200", in_cgroup=True
    )
    assert fill.returncode != 0 and "No space left" in fill.stderr, fill
    image = TenantPaths(tight_shim.config, hog.name).data_image
    used = image.stat().st_blocks * 512
    assert used <= TIGHT_DISK, f"the state disk gave the tenant {used} bytes"
    neighbour_is_fine(tight_shim, neighbour.name)


# Reads 200 MB into a shell variable: far past the machine's memory.
HOG = "x=$(head -c 200000000 /dev/zero | tr '\\0' a); echo survived ${#x}"


def test_exhausting_memory_stays_inside_the_default_limit(tight_shim: Shim) -> None:
    neighbour = tight_shim.start()
    hog = tight_shim.start()  # no memory in its spec: the shim's default applies
    limit = cgroup_file(tight_shim, hog.name, "memory.max", "memory.limit_in_bytes")
    assert int(limit.read_text()) == TIGHT_MEMORY
    result = tight_shim.run_in(hog, "sh", "-c", HOG, in_cgroup=True, timeout=120)
    assert "survived" not in result.stdout, "the hog got its 200 MB"
    assert result.returncode != 0
    assert tight_shim.runner.inspect(hog.name) is not None, "the machine itself runs on"
    neighbour_is_fine(tight_shim, neighbour.name)


# Starts 100 sleepers: past the machine's tasks limit the shell cannot fork.
FORKS = "i=0; while [ $i -lt 100 ]; do sleep 600 >/dev/null 2>&1 & i=$((i+1)); done; echo done"


def test_exhausting_pids_stays_inside_the_tasks_limit(
    tight_shim: Shim, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(cgroups, "DEFAULT_TASKS", 48)  # what a spec without tasks gets
    neighbour = tight_shim.start()
    hog = tight_shim.start()
    result = tight_shim.run_in(hog, "sh", "-c", FORKS, in_cgroup=True, timeout=60)
    assert "can't fork" in result.stderr, result
    current = cgroup_file(tight_shim, hog.name, "pids.current")
    assert int(current.read_text()) <= 48
    neighbour_is_fine(tight_shim, neighbour.name)
