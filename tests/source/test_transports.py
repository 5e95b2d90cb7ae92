"""Sync over every real transport: right commit, new commits followed, no fetch when unchanged."""

from __future__ import annotations

from pathlib import Path

import pygit2
import pytest

from bitbuilder.hostshim.api import GitCredentials
from bitbuilder.hostshim.errors import SourceError
from bitbuilder.hostshim.paths import TenantPaths
from bitbuilder.hostshim.source.git import GitSource
from tests.helpers.gitserve import TenantRepo, http_server, self_signed_cert
from tests.source.conftest import BASIC_LAYOUT, Remote, make_spec


def server_round_trips(remote: Remote) -> int:
    """How many times the server was asked for objects or refs (transport-specific count)."""
    server = remote.server
    if server is None:
        return 0
    if server.scheme == "http":  # GET info/refs = advertisement; POST = object negotiation
        return sum(1 for method, path in server.requests if method == "POST")
    if server.scheme == "git":  # one "Request upload-pack" per connection (ls or fetch)
        return server.log_count("Request upload-pack")
    return server.log_count("Accepted publickey")


# Per transport: round trips of an unchanged sync (ls only) and of a sync that fetches.
UNCHANGED_TRIPS = {"file": 0, "git": 1, "http": 0, "http-auth": 0, "ssh": 1}


def test_sync_checks_out_follows_and_skips_fetch_when_unchanged(
    remote: Remote,
    repo: TenantRepo,
    source: GitSource,
    paths: TenantPaths,
    fetch_calls: list[list[str] | None],
) -> None:
    first = repo.commit(BASIC_LAYOUT, "first")
    spec = remote.spec()
    assert spec.source is not None

    checkout = source.sync(spec)
    assert checkout.commit == first
    assert checkout.revision == f"main@sha1:{first}"
    assert checkout.tree == paths.revision(first)
    assert (checkout.tree / "confext/base/etc/motd").read_text() == "hello\n"
    assert checkout.layout.settings.hostname == "web-1"
    assert set(checkout.layout.units) == {"hello.service"}
    assert len(fetch_calls) == 1

    trips = server_round_trips(remote)
    assert source.remote_head(spec.source) == first
    again = source.sync(spec)
    assert again.commit == first and again.tree == checkout.tree
    assert again.tree.stat().st_ino == checkout.tree.stat().st_ino, "a tree is written once"
    assert len(fetch_calls) == 1, "the remote head was unchanged: nothing may be fetched"
    assert server_round_trips(remote) - trips == 2 * UNCHANGED_TRIPS[remote.kind]

    second = repo.commit({"confext/base/etc/motd": "bye\n"}, "second")
    assert source.remote_head(spec.source) == second
    updated = source.sync(spec)
    assert updated.commit == second and updated.forced_from is None
    assert (updated.tree / "confext/base/etc/motd").read_text() == "bye\n"
    assert (checkout.tree / "confext/base/etc/motd").read_text() == "hello\n", "old tree kept"
    assert len(fetch_calls) == 2


@pytest.mark.parametrize("remote", ["http-auth"], indirect=True)
def test_http_basic_auth_wrong_password_is_authentication_failed(
    remote: Remote, repo: TenantRepo, source: GitSource
) -> None:
    repo.commit(BASIC_LAYOUT)
    wrong = "not-the-password"
    spec = make_spec(remote.url, credentials=GitCredentials(username="tenant", password=wrong))
    with pytest.raises(SourceError) as caught:
        source.sync(spec)
    assert caught.value.reason == "AuthenticationFailed"
    assert wrong not in str(caught.value)
    no_creds = make_spec(remote.url)
    with pytest.raises(SourceError) as caught:
        source.sync(no_creds)
    assert caught.value.reason == "AuthenticationFailed"


def test_https_certificate_is_checked(
    repo: TenantRepo, source: GitSource, served: Path, tmp_path: Path
) -> None:
    commit = repo.commit(BASIC_LAYOUT)
    cert, key = self_signed_cert(tmp_path)
    with http_server(served, tls=(cert, key)) as https:
        spec = make_spec(https.url(repo.bare.name))
        with pytest.raises(SourceError) as caught:
            source.sync(spec)
        assert caught.value.reason == "AuthenticationFailed"
        assert "TLS certificate is not trusted" in caught.value.message
        assert not https.requests, "nothing is sent before the certificate is trusted"

        default_file, default_dir = pygit2.settings.ssl_cert_file, pygit2.settings.ssl_cert_dir
        assert default_dir is not None  # the system CA folder, restored below
        pygit2.settings.set_ssl_cert_locations(str(cert), None)
        try:
            assert source.sync(spec).commit == commit
        finally:
            pygit2.settings.set_ssl_cert_locations(default_file, default_dir)
