"""The reconcile core against an in-memory shim over a real unix socket."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TypeVar

from bitbuilder.hostshim.api import ApiError, ErrorInfo
from bitbuilder.operator.api import TenantPhase, TenantStatus
from bitbuilder.operator.reconcile import Node, finalize, placed_here, reconcile
from bitbuilder.operator.shimclient import ShimClient
from bitbuilder.operator.status import find_condition
from bitbuilder.operator.translate import FileSecrets
from tests.helpers.fakeshim import FakeShim, running_fake_shim
from tests.operator_core.conftest import SHA_A, SHA_B, make_tenant

T = TypeVar("T")
NODE = Node("node1", {"zone": "a"})


def with_shim(tmp_path: Path, body: Callable[[FakeShim, ShimClient], Awaitable[T]]) -> T:
    async def main() -> T:
        async with (
            running_fake_shim(tmp_path / "shim.sock") as fake,
            ShimClient(fake.socket, timeout=5) as client,
        ):
            return await body(fake, client)

    return asyncio.run(main())


def test_apply_then_new_commit_then_same_again(tmp_path: Path) -> None:
    tenant = make_tenant(resources={"memory": "64Mi"})
    secrets = FileSecrets(tmp_path)

    async def body(fake: FakeShim, shim: ShimClient) -> None:
        fake.heads["web"] = SHA_A
        first = await reconcile(tenant, shim, secrets, NODE)
        assert first.status is not None and first.status.phase is TenantPhase.running
        assert first.status.applied_revision == f"main@sha1:{SHA_A}"
        assert fake.specs["web"].resources.memory_bytes == 64 * 2**20
        assert first.requeue_after is not None and 270 <= first.requeue_after <= 330  # 5m ± 10%
        fake.heads["web"] = SHA_B
        second = await reconcile(tenant, shim, secrets, NODE, previous=first.status)
        assert second.status is not None and second.status.applied_revision == f"main@sha1:{SHA_B}"
        assert [e.reason for e in second.events] == ["RevisionApplied"]
        third = await reconcile(tenant, shim, secrets, NODE, previous=second.status)
        assert third.events == [] and third.status is not None
        assert third.status.model_dump(exclude={"source"}) == second.status.model_dump(
            exclude={"source"}
        )

    with_shim(tmp_path, body)


def test_missing_secret_stalls_without_calling_the_shim_put(tmp_path: Path) -> None:
    tenant = make_tenant(
        source={"url": "https://g/x.git", "ref": {"branch": "main"}, "secretRef": {"name": "git"}}
    )

    async def body(fake: FakeShim, shim: ShimClient) -> None:
        result = await reconcile(tenant, shim, FileSecrets(tmp_path), NODE)
        assert result.status is not None and result.status.phase is TenantPhase.failed
        stalled = find_condition(result.status, "Stalled")
        assert stalled is not None and stalled.reason == "SecretNotFound"
        assert ("PUT", "web") not in fake.requests
        assert (
            result.requeue_after is not None and result.requeue_after < 10
        )  # backoff starts small
        assert any(e.type == "Warning" and e.reason == "SecretNotFound" for e in result.events)

    with_shim(tmp_path, body)


def test_validation_error_from_the_shim_is_stalled(tmp_path: Path) -> None:
    async def body(fake: FakeShim, shim: ShimClient) -> None:
        fake.fail_with = (
            422,
            ApiError(error="ValidationFailed", message="image: unknown", field="image"),
        )
        result = await reconcile(make_tenant(), shim, FileSecrets(None), NODE)
        assert result.status is not None
        ready = find_condition(result.status, "Ready")
        assert ready is not None and (ready.status, ready.reason) == ("False", "ValidationFailed")
        assert "image: unknown" in ready.message

    with_shim(tmp_path, body)


def test_unreachable_shim_is_transient(tmp_path: Path) -> None:
    async def main() -> None:
        async with ShimClient(tmp_path / "nobody.sock", timeout=2) as shim:
            result = await reconcile(make_tenant(), shim, FileSecrets(None), NODE)
        assert result.status is not None
        ready = find_condition(result.status, "Ready")
        assert ready is not None and (ready.status, ready.reason) == ("Unknown", "ShimUnavailable")
        assert result.status.phase is TenantPhase.pending

    asyncio.run(main())


def test_source_error_keeps_last_good_revision(tmp_path: Path) -> None:
    async def body(fake: FakeShim, shim: ShimClient) -> None:
        fake.heads["web"] = SHA_A
        good = await reconcile(make_tenant(), shim, FileSecrets(None), NODE)
        fake.heads["web"] = SHA_B
        fake.source_errors["web"] = ErrorInfo(
            reason="UntrustedSignature",
            message="commit not signed",
            revision=SHA_B,
            at=fake.machines["web"].history[0].applied_at,
        )
        bad = await reconcile(make_tenant(), shim, FileSecrets(None), NODE, previous=good.status)
        assert bad.status is not None and bad.status.applied_revision == f"main@sha1:{SHA_A}"
        stalled = find_condition(bad.status, "Stalled")
        assert stalled is not None and stalled.reason == "UntrustedSignature"

    with_shim(tmp_path, body)


def test_placement() -> None:
    assert placed_here(make_tenant(), NODE)
    assert placed_here(make_tenant(nodeName="node1", nodeSelector={"zone": "a"}), NODE)
    assert not placed_here(make_tenant(nodeName="node2"), NODE)
    assert not placed_here(make_tenant(nodeSelector={"zone": "b"}), NODE)
    assert not placed_here(make_tenant(nodeSelector={"disk": "ssd"}), NODE)


def test_tenant_moved_elsewhere_is_stopped_here(tmp_path: Path) -> None:
    async def body(fake: FakeShim, shim: ShimClient) -> None:
        fake.heads["web"] = SHA_A
        await reconcile(make_tenant(), shim, FileSecrets(None), NODE)
        result = await reconcile(make_tenant(nodeName="node2"), shim, FileSecrets(None), NODE)
        assert result.status is None and result.requeue_after is None
        assert "web" not in fake.machines

    with_shim(tmp_path, body)


def test_suspend_reaches_the_shim(tmp_path: Path) -> None:
    async def body(fake: FakeShim, shim: ShimClient) -> None:
        fake.heads["web"] = SHA_A
        result = await reconcile(make_tenant(suspend=True), shim, FileSecrets(None), NODE)
        assert fake.specs["web"].suspend
        assert result.status is not None and result.status.phase is TenantPhase.suspended

    with_shim(tmp_path, body)


def test_image_url_is_imported_once(tmp_path: Path) -> None:
    sha = "c" * 64
    tenant = make_tenant(image={"name": "deb", "url": "https://i/deb.tar", "sha256": sha})

    async def body(fake: FakeShim, shim: ShimClient) -> None:
        fake.heads["web"] = SHA_A
        await reconcile(tenant, shim, FileSecrets(None), NODE)
        await reconcile(tenant, shim, FileSecrets(None), NODE)
        assert [r for r in fake.requests if r[0] == "PUT-IMAGE"] == [("PUT-IMAGE", "deb")]
        assert fake.images["deb"].sha256 == sha

    with_shim(tmp_path, body)


def test_finalize_removes_the_machine(tmp_path: Path) -> None:
    async def body(fake: FakeShim, shim: ShimClient) -> None:
        fake.heads["web"] = SHA_A
        await reconcile(make_tenant(), shim, FileSecrets(None), NODE)
        assert await finalize(make_tenant(), shim)
        assert "web" not in fake.machines
        assert await finalize(make_tenant(), shim)  # idempotent

    with_shim(tmp_path, body)


def test_progress_is_reported_while_the_shim_works(tmp_path: Path) -> None:
    seen: list[TenantStatus] = []

    async def record(status: TenantStatus) -> None:
        seen.append(status)

    async def body(fake: FakeShim, shim: ShimClient) -> None:
        fake.heads["web"] = SHA_A
        first = await reconcile(make_tenant(), shim, FileSecrets(None), NODE, progress=record)
        assert seen == []  # a quick PUT has nothing to report in between
        fake.heads["web"] = SHA_B
        fake.apply_seconds = 1.2
        result = await reconcile(
            make_tenant(), shim, FileSecrets(None), NODE, first.status, progress=record
        )
        assert [s.phase for s in seen] == [TenantPhase.updating]
        reconciling = find_condition(seen[0], "Reconciling")
        assert reconciling is not None and reconciling.status == "True"
        assert seen[0].applied_revision == f"main@sha1:{SHA_A}"
        assert result.status is not None and result.status.phase is TenantPhase.running
        assert result.status.applied_revision == f"main@sha1:{SHA_B}"

    with_shim(tmp_path, body)
