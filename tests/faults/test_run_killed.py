"""`bitbuilder run` (standalone) killed with SIGKILL in the middle of a reconcile (its PUT
waits on the shim's fetch) and restarted: the tenant comes up once, the other tenant keeps its
machine, and after the tenants leave nothing of theirs is left."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from bitbuilder.hostshim.config import ShimConfig
from tests.faults.conftest import FAULTS, leftovers, one_machine
from tests.helpers.gated_proxy import GatedProxy
from tests.standalone.conftest import Host, tenant_manifest

pytestmark = FAULTS


def _config(root: Path) -> ShimConfig:
    """The dirs of the standalone host's shim under `root`."""
    return ShimConfig(state_dir=root / "shim", runtime_dir=root / "run")


@pytest.fixture
def nothing_left(tmp_path: Path) -> Iterator[None]:
    """Checks, after the standalone host's own teardown, that nothing of it is left."""
    yield
    assert leftovers(_config(tmp_path), tmp_path, ("web", "api")) == []  # after host's teardown


def test_run_killed_mid_reconcile_and_restarted(nothing_left: None, host: Host) -> None:
    api = host.tenant_repo("api", "api v1").head()
    web = host.tenant_repo("web", "web v1").head()
    host.commit_fleet({"api.yaml": tenant_manifest("api", host.url("api"))})
    host.start_reconciler()
    host.wait_applied("api", api)
    api_pid = host.machine("api").leader_pid  # type: ignore[union-attr]

    with GatedProxy(host.git.port) as remote:
        url = host.url("web").replace(f":{host.git.port}/", f":{remote.port}/")
        host.commit_fleet({"web.yaml": tenant_manifest("web", url)})
        assert remote.held.wait(60), "the reconciler never got to web's fetch"
        (proc,) = [p for n, p in host.procs.children if n == "reconciler"]
        proc.kill()
        proc.wait()
        host.procs.children.remove(("reconciler", proc))
        remote.gate.set()
        host.start_reconciler()
        host.wait_applied("web", web)
        assert host.motd("web") == "web v1"
    assert host.machine("api").leader_pid == api_pid, "api's machine kept"  # type: ignore[union-attr]
    one_machine(_config(host.root), "web")
    assert sorted(host.state.names()) == ["api", "web"]
    for name in ("api", "web"):
        record = host.state.load(name)
        assert record is not None and record.status is not None, f"{name}'s record readable"
