"""The standalone driver against an in-memory shim: fleet changes, removal, ownership, triggers."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable, Coroutine
from contextlib import asynccontextmanager
from pathlib import Path

import yaml

from bitbuilder.hostshim.api import MachineSpec, VerifySpec
from bitbuilder.operator.fleet import FleetSnapshot, FolderFleet, GitFleet
from bitbuilder.operator.get import render
from bitbuilder.operator.localstate import LocalState, utcnow
from bitbuilder.operator.reconcile import Node
from bitbuilder.operator.shimclient import ShimClient
from bitbuilder.operator.standalone import Standalone
from bitbuilder.operator.status import find_condition
from bitbuilder.operator.translate import FileSecrets
from bitbuilder.operator.webhook import same_repo
from tests.helpers.fakeshim import FakeShim, running_fake_shim
from tests.helpers.gitserve import TenantRepo, ssh_signer
from tests.operator_core.conftest import SHA_A, SHA_B, tenant_object


async def until(check: Callable[[], object], what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


def write_tenant(fleet: Path, name: str, **spec: object) -> None:
    (fleet / f"{name}.yaml").write_text(yaml.safe_dump(tenant_object(name, **spec)))


@asynccontextmanager
async def driver(tmp_path: Path) -> AsyncIterator[tuple[Standalone, FakeShim, LocalState]]:
    fleet_dir = tmp_path / "fleet"
    fleet_dir.mkdir(exist_ok=True)
    state = LocalState(tmp_path / "state")
    async with (
        running_fake_shim(tmp_path / "shim.sock") as fake,
        ShimClient(fake.socket, timeout=5) as shim,
    ):
        d = Standalone(FolderFleet(fleet_dir), shim, FileSecrets(None), Node("n1"), state, 3600)
        stop = asyncio.Event()
        task = asyncio.create_task(d.run(stop))
        try:
            yield d, fake, state
        finally:
            stop.set()
            await asyncio.wait_for(task, 10)


def phase(state: LocalState, name: str) -> str | None:
    record = state.load(name)
    return None if record is None or record.status is None else record.status.phase


def observed(state: LocalState, name: str) -> int | None:
    record = state.load(name)
    return None if record is None or record.status is None else record.status.observed_generation


def fleet_of(tmp_path: Path, *names: str) -> Path:
    fleet = tmp_path / "fleet"
    fleet.mkdir()
    for name in names:
        write_tenant(fleet, name)
    return fleet


async def all_running(fake: FakeShim, state: LocalState, *names: str) -> None:
    fake.heads.update(dict.fromkeys(names, SHA_A))
    await until(lambda: all(phase(state, n) == "Running" for n in names), f"{names} running")


def run(body: Callable[[], Coroutine[object, object, None]]) -> None:
    asyncio.run(body())


def test_fleet_lifecycle(tmp_path: Path) -> None:
    fleet = fleet_of(tmp_path, "a", "b")

    async def body() -> None:
        async with driver(tmp_path) as (d, fake, state):
            await all_running(fake, state, "a", "b")
            table = render(state.records(), "table", utcnow())
            assert table.split("\n")[0].split() == [
                "NAME",
                "RUNTIME",
                "PHASE",
                "REVISION",
                "NODE",
                "READY",
                "AGE",
            ]
            assert table.split("\n")[1].split()[:6] == [
                "a",
                "nspawn",
                "Running",
                SHA_A[:7],
                "n1",
                "True",
            ]

            # a spec change: new generation, reconciled at once
            write_tenant(fleet, "a", resources={"memory": "64Mi"})
            await d.refresh_fleet()
            await until(lambda: fake.specs["a"].resources.memory_bytes == 64 * 2**20, "new spec")
            record = state.load("a")
            assert record is not None and record.generation == 2
            await until(lambda: observed(state, "a") == 2, "generation 2 observed")

            # a trigger: the new commit is picked up without waiting for the interval
            fake.heads["b"] = SHA_B
            assert await d.trigger_url("https://git.example/web") == ["a", "b"]
            await until(lambda: fake.machines["b"].applied_revision == SHA_B, "b at SHA_B")

            # removal from the fleet removes the machine and forgets it
            (fleet / "b.yaml").unlink()
            await d.refresh_fleet()
            await until(lambda: "b" not in fake.machines and state.load("b") is None, "b removed")
            assert "a" in fake.machines

    run(body)


def test_broken_manifest_keeps_others_and_its_own_machine(tmp_path: Path) -> None:
    fleet = fleet_of(tmp_path, "a", "b")

    async def body() -> None:
        async with driver(tmp_path) as (d, fake, state):
            await all_running(fake, state, "a", "b")
            write_tenant(fleet, "b", resources={"cpu": "lots"})
            snapshot = await d.refresh_fleet()
            assert snapshot is not None and [p.name for p in snapshot.problems] == ["b"]
            fleet_record = state.load_fleet()
            assert fleet_record is not None and "cpu" in fleet_record.problems[0]
            assert "b" in fake.machines and state.load("b") is not None
            assert d.trigger(["a"]) == ["a"]

    run(body)


def test_an_unreadable_manifest_removes_no_tenant(tmp_path: Path) -> None:
    """A YAML syntax error names no tenant: removing what it held would delete its data."""
    fleet = fleet_of(tmp_path, "a", "b", "c")

    async def body() -> None:
        async with driver(tmp_path) as (d, fake, state):
            await all_running(fake, state, "a", "b", "c")
            (fleet / "b.yaml").write_text("kind: Tenant\nspec: [\n")
            (fleet / "c.yaml").unlink()  # even a real removal waits until the fleet reads again
            snapshot = await d.refresh_fleet()
            assert snapshot is not None and [p.file for p in snapshot.problems] == ["b.yaml"]
            assert sorted(d.desired) == ["a", "b", "c"], "none is being removed"
            write_tenant(fleet, "b")
            await d.refresh_fleet()
            await until(lambda: "c" not in fake.machines, "c removed once the fleet reads")
            assert {"a", "b"} <= set(fake.machines)

    run(body)


def test_only_machines_it_created_are_removed(tmp_path: Path) -> None:
    async def body() -> None:
        async with driver(tmp_path) as (d, fake, state):
            foreign = MachineSpec(name="foreign", image="base")
            fake.specs["foreign"] = foreign
            fake.machines["foreign"] = fake.status_for(foreign)
            write_tenant(tmp_path / "fleet", "a")
            fake.heads["a"] = SHA_A
            await d.refresh_fleet()
            await until(lambda: phase(state, "a") == "Running", "a running")
            (tmp_path / "fleet" / "a.yaml").unlink()
            await d.refresh_fleet()
            await until(lambda: "a" not in fake.machines, "a removed")
            assert "foreign" in fake.machines
            assert ("DELETE", "foreign") not in fake.requests

    run(body)


def test_state_survives_a_restart_and_removal_happens_after_it(tmp_path: Path) -> None:
    (tmp_path / "fleet").mkdir()
    write_tenant(tmp_path / "fleet", "a")

    async def body() -> None:
        async with driver(tmp_path) as (_, fake, state):
            fake.heads["a"] = SHA_A
            await until(lambda: phase(state, "a") == "Running", "a running")
        (tmp_path / "fleet" / "a.yaml").unlink()
        async with driver(tmp_path) as (_, fake, state):
            # a fresh (empty) fake shim: removal of a machine that is already gone is fine too
            await until(lambda: state.load("a") is None, "a forgotten")

    run(body)


def test_tenant_of_another_node_is_left_alone(tmp_path: Path) -> None:
    (tmp_path / "fleet").mkdir()
    write_tenant(tmp_path / "fleet", "a", nodeName="elsewhere")
    write_tenant(tmp_path / "fleet", "b")

    async def body() -> None:
        async with driver(tmp_path) as (_, fake, state):
            fake.heads.update(a=SHA_A, b=SHA_A)
            await until(lambda: phase(state, "b") == "Running", "b running")
            assert "a" not in fake.machines and state.load("a") is None
            assert ("PUT", "a") not in fake.requests and ("DELETE", "a") not in fake.requests

    run(body)


def test_same_repo_spellings() -> None:
    assert same_repo("https://github.com/o/r.git", "https://github.com/O/r/")
    assert same_repo("git@github.com:o/r.git", "ssh://git@github.com/o/r")
    assert same_repo("git://127.0.0.1:9418/r.git", "git://127.0.0.1:9418/r")
    assert not same_repo("https://github.com/o/r", "https://github.com/o/r2")


def test_shim_down_at_start_then_up(tmp_path: Path) -> None:
    """Tenants wait (Ready Unknown, retried with backoff) until the shim answers."""
    (tmp_path / "fleet").mkdir()
    write_tenant(tmp_path / "fleet", "a")
    state = LocalState(tmp_path / "state")
    socket = tmp_path / "shim.sock"

    async def body() -> None:
        async with ShimClient(socket, timeout=2) as shim:
            fleet = FolderFleet(tmp_path / "fleet")
            d = Standalone(fleet, shim, FileSecrets(None), Node("n1"), state, 3600)
            stop = asyncio.Event()
            task = asyncio.create_task(d.run(stop))
            try:
                await until(lambda: phase(state, "a"), "a first status")
                record = state.load("a")
                ready = find_condition(record.status if record else None, "Ready")
                assert ready is not None
                assert (ready.status, ready.reason) == ("Unknown", "ShimUnavailable")
                async with running_fake_shim(socket) as fake:
                    fake.heads["a"] = SHA_A
                    await until(lambda: phase(state, "a") == "Running", "a running", timeout=20)
                    stop.set()
                    await asyncio.wait_for(task, 10)
            finally:
                stop.set()
                await asyncio.wait_for(task, 10)

    run(body)


def test_a_push_to_the_fleet_repo_rereads_the_fleet(tmp_path: Path) -> None:
    async def body() -> None:
        async with driver(tmp_path) as (d, fake, state):
            fake.heads["a"] = SHA_A
            write_tenant(tmp_path / "fleet", "a")
            assert await d.trigger_url(str(tmp_path / "fleet")) == ["(fleet)"]
            await until(lambda: phase(state, "a") == "Running", "a picked up without the interval")

    run(body)


class CountingFleet(FolderFleet):
    reads = 0

    def snapshot(self, revision: str | None = None) -> FleetSnapshot:
        self.reads += 1
        return super().snapshot(revision)


def test_an_unchanged_fleet_is_not_read_again(tmp_path: Path) -> None:
    (tmp_path / "fleet").mkdir()
    write_tenant(tmp_path / "fleet", "a")
    fleet = CountingFleet(tmp_path / "fleet")

    async def body() -> None:
        async with (
            running_fake_shim(tmp_path / "shim.sock") as fake,
            ShimClient(fake.socket) as shim,
        ):
            d = Standalone(fleet, shim, FileSecrets(None), Node("n1"), LocalState(tmp_path / "s"))
            first = await d.refresh_fleet()
            assert await d.refresh_fleet() is first and fleet.reads == 1
            write_tenant(tmp_path / "fleet", "b")
            second = await d.refresh_fleet()
            assert second is not None and sorted(second.tenants) == ["a", "b"] and fleet.reads == 2
            for task in d.workers.values():
                task.cancel()
            await asyncio.gather(*d.workers.values(), return_exceptions=True)

    run(body)


def test_an_unsigned_fleet_commit_changes_nothing(tmp_path: Path) -> None:
    signer = ssh_signer(tmp_path / "keys", "ops")
    repo = TenantRepo(tmp_path / "git", "fleet.git")
    repo.commit({"a.yaml": yaml.safe_dump(tenant_object("a"))}, "a", signer=signer)
    fleet = GitFleet(
        repo.file_url(), "main", tmp_path / "w", verify=VerifySpec(ssh_keys=[signer.public_key])
    )
    state = LocalState(tmp_path / "state")

    async def body() -> None:
        async with (
            running_fake_shim(tmp_path / "shim.sock") as fake,
            ShimClient(fake.socket) as shim,
        ):
            fake.heads["a"] = SHA_A
            d = Standalone(fleet, shim, FileSecrets(None), Node("n1"), state, 3600)
            await d.refresh_fleet()
            await until(lambda: phase(state, "a") == "Running", "a running")
            repo.remove("a.yaml")
            repo.commit({"b.yaml": yaml.safe_dump(tenant_object("b"))}, "unsigned: a out, b in")
            assert await d.refresh_fleet() is None
            record = state.load_fleet()
            assert record is not None and record.error is not None
            assert "not signed by a trusted key" in record.error
            assert list(d.desired) == ["a"] and "a" in fake.machines and "b" not in fake.specs
            for task in d.workers.values():
                task.cancel()
            await asyncio.gather(*d.workers.values(), return_exceptions=True)

    run(body)
