"""Source URLs that name the host itself (SSRF) are refused before any connection, unless the
shim allows that network; the remote's ref list is bounded."""

from __future__ import annotations

import ipaddress
import json
import subprocess
from dataclasses import replace
from pathlib import Path

import pytest

from bitbuilder.hostshim.config import ShimConfig
from bitbuilder.hostshim.errors import SourceError
from bitbuilder.hostshim.paths import TenantPaths
from bitbuilder.hostshim.source import git as source_module
from bitbuilder.hostshim.source.addresses import refusal
from bitbuilder.hostshim.source.git import GitSource, SourceNotAllowed
from tests.helpers.gitserve import TenantRepo, git, git_daemon
from tests.source.conftest import BASIC_LAYOUT, make_spec

POOL = ipaddress.ip_network("10.250.0.0/16")


def host_address() -> str | None:
    """A global address of one of this host's interfaces (for the 'own address' case)."""
    out = subprocess.run(["ip", "-j", "addr", "show"], capture_output=True, text=True).stdout
    for entry in json.loads(out or "[]"):
        for info in entry.get("addr_info", []):
            if info.get("scope") == "global" and not info["local"].startswith("10.250."):
                return str(info["local"])
    return None


@pytest.mark.parametrize(
    ("url", "why"),
    [
        ("git://127.0.0.1/repo.git", "a loopback address"),
        ("https://localhost/repo.git", "a loopback address"),
        ("ssh://git@[::1]/repo.git", "a loopback address"),
        ("git@127.0.0.2:repo.git", "a loopback address"),
        ("http://[::ffff:127.0.0.1]/repo.git", "a loopback address"),
        ("http://169.254.169.254/latest/meta-data", "a link-local address"),
        ("http://[fe80::1]/repo.git", "a link-local address"),
        ("git://0.0.0.0/repo.git", "not a unicast address"),
        ("git://10.250.0.1/repo.git", "an address of the machines' links"),
    ],
)
def test_urls_naming_the_host_are_refused(url: str, why: str) -> None:
    refused = refusal(url, (), POOL)
    assert refused is not None and why in refused, refused
    assert "--allow-source-network" in refused


def test_the_hosts_own_address_is_refused() -> None:
    address = host_address()
    if address is None:
        pytest.skip("this host has no global address")
    refused = refusal(f"git://{address}/repo.git", (), POOL)
    assert refused is not None and "an address of this host" in refused


def test_other_hosts_and_allowed_networks_pass() -> None:
    assert refusal("https://192.0.2.10/repo.git", (), POOL) is None  # TEST-NET-1, not ours
    assert refusal("file:///srv/repo.git", (), POOL) is None  # file:// has its own roots
    allowed = (ipaddress.ip_network("127.0.0.0/8"),)
    assert refusal("git://127.0.0.1:9418/repo.git", allowed, POOL) is None
    assert refusal("git://[::1]/repo.git", allowed, POOL) is not None, "v6 loopback is not in it"


def test_a_loopback_server_is_never_contacted_unless_allowed(
    served: Path, repo: TenantRepo, config: ShimConfig
) -> None:
    repo.commit(BASIC_LAYOUT, "first")
    strict = replace(config, source_networks=())
    with git_daemon(served) as daemon:
        spec = make_spec(daemon.url(repo.bare.name))
        assert spec.source is not None
        source = GitSource(TenantPaths(strict, "t1"), strict)
        with pytest.raises(SourceNotAllowed, match="a loopback address"):
            source.sync(spec)
        with pytest.raises(SourceNotAllowed):
            source.remote_head(spec.source)
        assert daemon.log_count("Request upload-pack") == 0, "the server was never asked"
        assert GitSource(TenantPaths(config, "t1"), config).sync(spec).commit == repo.head()


def test_a_remote_with_too_many_refs_is_refused(
    repo: TenantRepo, source: GitSource, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = repo.commit(BASIC_LAYOUT, "first")
    monkeypatch.setattr(source_module, "MAX_REFS", 5)
    spec = make_spec(repo.file_url())
    assert source.sync(spec).commit == first
    for i in range(5):
        git("update-ref", f"refs/tags/t{i}", first, cwd=repo.bare)
    with pytest.raises(SourceError) as refused:
        source.sync(spec)
    assert refused.value.reason == "TooManyRefs"
    assert "more than the 5 refs" in refused.value.message
