"""`bitbuilder run` with a fleet git repo: tenants come, change, break and go."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import aiohttp

from bitbuilder.operator.webhook import sign
from tests.helpers.wait import wait_for
from tests.standalone.conftest import REAL_HOST, WEBHOOK_SECRET, Host, motd, tenant_manifest

pytestmark = REAL_HOST


def test_two_tenants_run_update_and_one_leaves(host: Host) -> None:
    web = host.tenant_repo("web", "web v1").head()
    api = host.tenant_repo("api", "api v1").head()
    host.commit_fleet(
        {
            "tenants/web.yaml": tenant_manifest("web", host.url("web")),
            "tenants/api.yaml": tenant_manifest("api", host.url("api")),
            "tenants/kustomization.yaml": {"resources": ["web.yaml", "api.yaml"]},
        }
    )
    host.start_reconciler()
    host.wait_applied("web", web)
    host.wait_applied("api", api)
    assert host.motd("web") == "web v1" and host.motd("api") == "api v1"

    table = host.get_tenants().stdout.splitlines()
    assert table[0].split() == ["NAME", "RUNTIME", "PHASE", "REVISION", "NODE", "READY", "AGE"]
    rows = {line.split()[0]: line.split() for line in table[1:]}
    ready = host.condition("web", "Ready")
    assert rows["web"][1:6] == ["nspawn", "Running", web[:7], rows["web"][4], "True"], ready
    assert rows["api"][3] == api[:7]

    # a commit in a tenant repo rolls out on the tenant's interval; the other is untouched
    api_pid = host.machine("api").leader_pid  # type: ignore[union-attr]
    web2 = host.repos["web"].commit(motd("web v2"), "v2")
    host.wait_applied("web", web2)
    assert host.motd("web") == "web v2"
    assert host.machine("api").leader_pid == api_pid  # type: ignore[union-attr]

    # api leaves the fleet: its machine is stopped and removed, web keeps running
    host.commit_fleet(
        {"tenants/kustomization.yaml": {"resources": ["web.yaml"]}}, remove=("tenants/api.yaml",)
    )
    wait_for(lambda: host.machine("api") is None, timeout=60, what="api removed")
    wait_for(lambda: host.state.load("api") is None, timeout=10, what="api forgotten")
    wait_for(lambda: not Path(f"/proc/{api_pid}").exists(), timeout=30, what="api's machine gone")
    assert host.applied("web") == web2
    assert [line.split()[0] for line in host.get_tenants().stdout.splitlines()[1:]] == ["web"]


def test_broken_manifest_is_reported_and_the_rest_runs(host: Host) -> None:
    web = host.tenant_repo("web", "web v1").head()
    broken = tenant_manifest("bad", host.url("web"), resources={"cpu": "a lot"})
    host.commit_fleet({"web.yaml": [tenant_manifest("web", host.url("web")), broken]})
    host.start_reconciler()
    host.wait_applied("web", web)
    assert host.machine("bad") is None
    result = host.get_tenants()
    assert "web" in result.stdout and "bad" not in result.stdout
    assert "web.yaml (document 2) (tenant 'bad')" in result.stderr and "cpu" in result.stderr

    # web's own manifest breaks later: reported, and its machine is not removed for it
    pid = host.machine("web").leader_pid  # type: ignore[union-attr]
    revision = host.commit_fleet(
        {"web.yaml": [tenant_manifest("web", host.url("web"), runtime="qemu")]}
    )
    wait_for(
        lambda: (f := host.state.load_fleet()) is not None and f.revision == revision,
        timeout=30,
        what="the fleet re-read",
    )
    fleet = host.state.load_fleet()
    assert fleet is not None and any("tenant 'web'" in p and "runtime" in p for p in fleet.problems)
    assert host.machine("web").leader_pid == pid  # type: ignore[union-attr]
    assert host.state.load("web") is not None


def post(host: Host, body: bytes, headers: dict[str, str]) -> tuple[int, object]:
    async def main() -> tuple[int, object]:
        url = f"http://127.0.0.1:{host.webhook_port}/hook"
        async with aiohttp.ClientSession() as http, http.post(url, data=body, headers=headers) as r:
            return r.status, await r.json()

    return asyncio.run(main())


def test_signed_webhook_push_updates_at_once_and_a_bad_one_changes_nothing(host: Host) -> None:
    first = host.tenant_repo("web", "web v1").head()
    host.commit_fleet({"web.yaml": tenant_manifest("web", host.url("web"), interval="1h")})
    host.start_reconciler(webhook=True)
    host.wait_applied("web", first)
    second = host.repos["web"].commit(motd("web v2"), "v2")
    payload = json.dumps({"repository": {"clone_url": host.url("web")}}).encode()

    forged = {"X-Hub-Signature-256": "sha256=" + sign(b"not the secret", payload)}
    assert post(host, payload, forged) == (401, {"error": "bad signature"})
    assert host.applied("web") == first
    assert "bad or missing signature" in host.reconciler_log()
    assert "triggered" not in host.reconciler_log()

    signed = {"X-Hub-Signature-256": "sha256=" + sign(WEBHOOK_SECRET, payload)}
    assert post(host, payload, signed) == (202, {"triggered": ["web"]})
    host.wait_applied("web", second, timeout=30)  # the interval is an hour: only the push did it
    assert host.motd("web") == "web v2"


def test_suspend_stops_the_machine_and_resume_brings_it_back(host: Host) -> None:
    commit = host.tenant_repo("web", "web v1").head()
    host.commit_fleet({"web.yaml": tenant_manifest("web", host.url("web"))})
    host.start_reconciler()
    host.wait_applied("web", commit)
    pid = host.machine("web").leader_pid  # type: ignore[union-attr]

    host.commit_fleet({"web.yaml": tenant_manifest("web", host.url("web"), suspend=True)})
    wait_for(lambda: host.phase("web") == "Suspended", timeout=60, what="web suspended")
    wait_for(lambda: not Path(f"/proc/{pid}").exists(), timeout=30, what="web's machine stopped")
    machine = host.machine("web")
    assert machine is not None and machine.phase == "Stopped"  # stopped, not deleted
    assert host.condition("web", "MachineReady")[:2] == ("False", "Suspended")  # type: ignore[index]
    record = host.state.load("web")
    assert record is not None and record.generation == 2

    host.commit_fleet({"web.yaml": tenant_manifest("web", host.url("web"))})
    host.wait_applied("web", commit)
    assert host.motd("web") == "web v1"
    assert host.machine("web").leader_pid != pid  # type: ignore[union-attr]


def test_killed_reconciler_restarts_and_converges(host: Host) -> None:
    web = host.tenant_repo("web", "web v1").head()
    api = host.tenant_repo("api", "api v1").head()
    host.commit_fleet(
        {
            "web.yaml": tenant_manifest("web", host.url("web")),
            "api.yaml": tenant_manifest("api", host.url("api")),
        }
    )
    host.start_reconciler()
    host.wait_applied("web", web)
    host.wait_applied("api", api)
    web_pid = host.machine("web").leader_pid  # type: ignore[union-attr]
    (proc,) = [p for n, p in host.procs.children if n == "reconciler"]
    proc.kill()
    proc.wait()
    host.procs.children.remove(("reconciler", proc))

    # while it is down: a new commit for web, api leaves the fleet; the machines keep running
    web2 = host.repos["web"].commit(motd("web v2"), "v2")
    host.commit_fleet({}, remove=("api.yaml",))
    assert host.machine("web").leader_pid == web_pid  # type: ignore[union-attr]

    host.start_reconciler()
    host.wait_applied("web", web2)
    wait_for(lambda: host.machine("api") is None, timeout=60, what="api removed after restart")
    assert host.state.names() == ["web"]
    assert host.motd("web") == "web v2"
