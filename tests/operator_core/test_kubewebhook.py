"""`bitbuilder webhook` (cluster): a signed push stamps the reconcile-request annotation on the
Tenants that follow the pushed repo, against the emulated API server."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest
from kubernetes import client as k8s

from bitbuilder.operator.api import RECONCILE_REQUESTED_ANNOTATION
from bitbuilder.operator.crd import tenant_crd
from bitbuilder.operator.kubewebhook import TenantRequests
from bitbuilder.operator.webhook import sign, start_webhook
from tests.helpers.kube_emulator import Emulator, EmulatorThread
from tests.helpers.kube_http import TENANTS, Kube
from tests.operator_core.conftest import tenant_object

SECRET = b"cluster-webhook-secret-0123"


@pytest.fixture
def kube() -> Iterator[Kube]:
    with EmulatorThread(Emulator([tenant_crd()])) as server:
        yield Kube(server.url)


def annotation(kube: Kube, name: str) -> str | None:
    obj = kube.get(f"{TENANTS}/{name}")
    assert obj is not None
    value: str | None = obj["metadata"].get("annotations", {}).get(RECONCILE_REQUESTED_ANNOTATION)
    return value


def test_signed_push_requests_a_sync_of_matching_tenants(kube: Kube, tmp_path: Path) -> None:
    web = tenant_object("web")
    other = tenant_object(
        "other", source={"url": "https://git.example/other.git", "ref": {"branch": "main"}}
    )
    for obj in (web, other):
        obj["metadata"].pop("generation")
        kube.ok("POST", TENANTS, obj)
    secret = tmp_path / "secret"
    secret.write_bytes(SECRET)
    api = k8s.ApiClient(k8s.Configuration(host=kube.url))
    body = json.dumps({"repository": {"html_url": "https://git.example/web"}}).encode()

    async def main() -> None:
        runner = await start_webhook("127.0.0.1:0", secret, TenantRequests(api))
        url = f"http://127.0.0.1:{runner.addresses[0][1]}/hook"
        try:
            async with aiohttp.ClientSession() as http:
                forged = {"X-Hub-Signature-256": "sha256=" + sign(b"wrong-secret-entirely", body)}
                async with http.post(url, data=body, headers=forged) as denied:
                    assert denied.status == 401
                assert annotation(kube, "web") is None
                signed = {"X-Hub-Signature-256": "sha256=" + sign(SECRET, body)}
                async with http.post(url, data=body, headers=signed) as ok:
                    assert (ok.status, await ok.json()) == (202, {"triggered": ["web"]})
        finally:
            await runner.cleanup()

    try:
        asyncio.run(main())
    finally:
        api.close()  # type: ignore[no-untyped-call]
    assert annotation(kube, "web") is not None
    assert annotation(kube, "other") is None
