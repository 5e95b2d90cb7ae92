"""Fixtures for the git source: a tenant repo, a GitSource under a temp state dir, remotes.

`remote` is parametrized over every transport (file, git daemon, smart HTTP, HTTP with basic
auth, ssh), each a real server on loopback started and stopped by the fixture.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pygit2
import pytest

from bitbuilder.hostshim.api import GitCredentials, MachineSpec
from bitbuilder.hostshim.config import ShimConfig
from bitbuilder.hostshim.paths import TenantPaths
from bitbuilder.hostshim.source.git import GitSource
from tests.helpers.gitserve import Server, TenantRepo, git_daemon, http_server, sshd

BASIC_LAYOUT: dict[str, Any] = {
    "machine.yaml": "hostname: web-1\n",
    "confext/base/etc/motd": "hello\n",
    "sysext/tools/usr/bin/tool": "#!/bin/sh\n",
    "units/hello.service": "[Service]\nExecStart=/bin/true\n",
}
USER, PASSWORD = "tenant", "s3cret-pa55"


LOOPBACK = ipaddress.ip_network("127.0.0.0/8")


@pytest.fixture
def served(tmp_path: Path) -> Path:
    """The folder every server exports (also the file:// root the shim allows)."""
    folder = tmp_path / "served"
    folder.mkdir()
    return folder


@pytest.fixture
def config(tmp_path: Path, served: Path) -> ShimConfig:
    return ShimConfig(
        state_dir=tmp_path / "state",
        runtime_dir=tmp_path / "run",
        file_source_roots=(served,),
        source_networks=(LOOPBACK,),  # the test servers listen there
    )


@pytest.fixture
def paths(config: ShimConfig) -> TenantPaths:
    return TenantPaths(config, "t1")


@pytest.fixture
def source(paths: TenantPaths, config: ShimConfig) -> GitSource:
    return GitSource(paths, config)


@pytest.fixture
def repo(served: Path) -> TenantRepo:
    return TenantRepo(served)


@dataclass(frozen=True)
class Remote:
    kind: str
    url: str
    credentials: GitCredentials | None
    server: Server | None

    def spec(self, **source: Any) -> MachineSpec:
        return make_spec(self.url, credentials=self.credentials, **source)


def make_spec(
    url: str,
    *,
    repo_settings: tuple[str, ...] = ("hostname",),
    extensions: list[dict[str, str]] | None = None,
    **source: Any,
) -> MachineSpec:
    """A MachineSpec for tenant t1; `source` holds SourceSpec fields (ref defaults to main)."""
    source.setdefault("ref", {"branch": "main"})
    return MachineSpec.model_validate(
        {
            "name": "t1",
            "image": "base",
            "source": {"url": url, **source},
            "repo_settings": list(repo_settings),
            "extensions": extensions,
        }
    )


TRANSPORTS = ["file", "git", "http", "http-auth", "ssh"]


@pytest.fixture(params=TRANSPORTS)
def remote(request: pytest.FixtureRequest, repo: TenantRepo, served: Path) -> Iterator[Remote]:
    yield from serve(request.param, repo, served)


def serve(kind: str, repo: TenantRepo, served: Path) -> Iterator[Remote]:
    name = repo.bare.name
    if kind == "file":
        yield Remote(kind, repo.file_url(), None, None)
    elif kind == "git":
        with git_daemon(served) as daemon:
            yield Remote(kind, daemon.url(name), None, daemon)
    elif kind in ("http", "http-auth"):
        auth = (USER, PASSWORD) if kind == "http-auth" else None
        creds = GitCredentials(username=USER, password=PASSWORD) if auth else None
        with http_server(served, auth=auth) as http:
            yield Remote(kind, http.url(name), creds, http)
    else:
        with sshd(served) as (server, keys):
            creds = GitCredentials(
                ssh_private_key=keys.private_key, ssh_known_hosts=keys.known_hosts
            )
            yield Remote(kind, server.url(name), creds, server)


@pytest.fixture
def file_remote(repo: TenantRepo, served: Path) -> Iterator[Remote]:
    yield from serve("file", repo, served)


@pytest.fixture
def fetch_calls(monkeypatch: pytest.MonkeyPatch) -> list[list[str] | None]:
    """Every pygit2 Remote.fetch the code under test makes (its refspecs)."""
    calls: list[list[str] | None] = []
    original: Callable[..., Any] = pygit2.Remote.fetch

    def counting(self: pygit2.Remote, refspecs: list[str] | None = None, **kw: Any) -> Any:
        calls.append(refspecs)
        return original(self, refspecs, **kw)

    monkeypatch.setattr(pygit2.Remote, "fetch", counting)
    return calls
