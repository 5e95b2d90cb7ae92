"""HostProfiles in standalone mode, against the in-memory shim: a profile that selects this node
reaches the shim with its keys resolved, its status follows the shim's answer, one that does not
select the node never does, and one that leaves the fleet is unmerged (a broken one is not)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import yaml

from bitbuilder.hostshim.api import ErrorInfo
from bitbuilder.operator.fleet import FolderFleet, read_fleet
from bitbuilder.operator.localstate import LocalState
from bitbuilder.operator.reconcile import Node
from bitbuilder.operator.shimclient import ShimClient
from bitbuilder.operator.standalone import Standalone
from bitbuilder.operator.status import find_condition
from bitbuilder.operator.translate import FileSecrets
from tests.helpers.fakeshim import FakeShim, running_fake_shim
from tests.operator_core.conftest import SHA_A, SHA_B
from tests.operator_core.test_standalone_driver import until, write_tenant

KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIGq0h9y8oBmLw1dJ0Hn0Yd3JrQjt3sUqQ7tY1h3Yv0aB ops"
NODE = Node("n1", {"role": "hypervisor"})


def profile(name: str = "base", **selector: str) -> dict[str, Any]:
    return {
        "apiVersion": "bitbuilder.io/v1alpha1",
        "kind": "HostProfile",
        "metadata": {"name": name},
        "spec": {
            "source": {
                "url": "https://git.example.com/ops/host.git",
                "ref": {"branch": "main"},
                "interval": "1h",
                "verify": {"secretRef": {"name": "host-keys"}},
            },
            "nodeSelector": selector,
        },
    }


def write(fleet: Path, name: str, doc: object) -> None:
    (fleet / f"{name}.yaml").write_text(yaml.safe_dump(doc))


@asynccontextmanager
async def standalone(tmp_path: Path) -> AsyncIterator[tuple[Standalone, FakeShim, Path]]:
    fleet = tmp_path / "fleet"
    fleet.mkdir()
    (tmp_path / "secrets" / "host-keys").mkdir(parents=True)
    (tmp_path / "secrets" / "host-keys" / "ops.pub").write_text(KEY + "\n")
    async with (
        running_fake_shim(tmp_path / "shim.sock") as fake,
        ShimClient(fake.socket, timeout=5) as shim,
    ):
        secrets = FileSecrets(tmp_path / "secrets")
        state = LocalState(tmp_path / "state")
        driver = Standalone(FolderFleet(fleet), shim, secrets, NODE, state, 3600)
        yield driver, fake, fleet


async def run_until(driver: Standalone, check: Any, what: str) -> None:
    stop = asyncio.Event()
    task = asyncio.create_task(driver.run(stop))
    try:
        await until(check, what)
    finally:
        stop.set()
        await asyncio.wait_for(task, 10)


def test_a_selecting_profile_is_merged_with_its_keys_and_reports_status(
    tmp_path: Path,
) -> None:
    async def body() -> None:
        async with standalone(tmp_path) as (driver, fake, fleet):
            write(fleet, "base", profile(role="hypervisor"))
            write(fleet, "other", profile("other", role="storage"))
            fake.heads["base"] = SHA_A
            await run_until(driver, lambda: "base" in driver.host.statuses, "the profile's status")
            spec = fake.host_specs["base"]
            assert spec.source.verify is not None and spec.source.verify.ssh_keys == [KEY]
            assert "other" not in fake.host_specs  # selects other nodes: never merged here
            status = driver.host.statuses["base"]
            assert (status.phase, status.applied_revision, status.node) == ("Applied", SHA_A, "n1")
            assert status.short_revision == SHA_A[:7]
            ready = find_condition(status, "Ready")
            assert ready is not None and ready.status == "True"

    asyncio.run(body())


def test_a_refused_revision_is_stalled_and_keeps_the_merged_one(tmp_path: Path) -> None:
    async def body() -> None:
        async with standalone(tmp_path) as (driver, fake, fleet):
            write(fleet, "base", profile())
            fake.heads["base"] = SHA_A
            await driver.refresh_fleet()
            await driver.host.sync_all()
            fake.heads["base"] = SHA_B
            fake.source_errors["base"] = ErrorInfo(
                reason="UnverifiedCommit", message="not signed", at=datetime.now(UTC)
            )
            await driver.host.sync_all()
            status = driver.host.statuses["base"]
            assert status.applied_revision == SHA_A
            stalled, ready = find_condition(status, "Stalled"), find_condition(status, "Ready")
            assert stalled is not None and (stalled.status, stalled.reason) == (
                "True",
                "UnverifiedCommit",
            )
            assert ready is not None and ready.status == "False"
            assert "the merged revision stays" in ready.message

    asyncio.run(body())


def test_a_profile_leaving_the_fleet_is_unmerged_but_not_a_broken_one(
    tmp_path: Path,
) -> None:
    async def body() -> None:
        async with standalone(tmp_path) as (driver, fake, fleet):
            write(fleet, "base", profile())
            write(fleet, "extra", profile("extra"))
            write_tenant(fleet, "web")
            fake.heads.update(base=SHA_A, extra=SHA_A)
            await driver.refresh_fleet()
            await driver.host.sync_all()
            assert set(fake.host_layers) == {"base", "extra"}
            broken = profile()
            broken["spec"]["source"]["ref"] = {}
            write(fleet, "base", broken)
            (fleet / "extra.yaml").unlink()
            snapshot = await driver.refresh_fleet()
            assert snapshot is not None and snapshot.broken_profiles == {"base"}
            assert snapshot.broken_names == set()  # a broken profile keeps no tenant alive
            await driver.host.sync_all()
            assert set(fake.host_layers) == {"base"}
            assert ("DELETE-HOST", "extra") in fake.requests

    asyncio.run(body())


def test_fleet_reads_profiles_beside_tenants_and_refuses_duplicates(tmp_path: Path) -> None:
    write(tmp_path, "base", profile())
    write(tmp_path, "copy", profile())
    write(tmp_path, "keep", profile("keep"))
    write_tenant(tmp_path, "web")
    snapshot = read_fleet(tmp_path, "r1")
    assert set(snapshot.tenants) == {"web"}
    assert set(snapshot.host_profiles) == {"keep"}
    assert snapshot.broken_profiles == {"base"}
    assert all("hostprofile 'base'" in str(p) for p in snapshot.problems)
