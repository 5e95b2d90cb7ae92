"""Refs, rollbacks and failures of GitSource.sync on real repositories (file:// and servers)."""

from __future__ import annotations

import logging
import os
import shutil
import socket
import stat
import time
from collections.abc import Iterator
from pathlib import Path

import pygit2
import pytest

from bitbuilder.hostshim.api import GitCredentials
from bitbuilder.hostshim.config import ShimConfig
from bitbuilder.hostshim.errors import LayoutError, SourceError
from bitbuilder.hostshim.paths import ImagePaths, TenantPaths
from bitbuilder.hostshim.source import git as source_module
from bitbuilder.hostshim.source.git import GitSource
from tests.helpers.gitserve import Link, TenantRepo, closed_port, git, ssh_keygen, write_files
from tests.source.conftest import BASIC_LAYOUT, Remote, make_spec, serve


def files_of(tree: Path) -> dict[str, str]:
    """{path: git blob id} of a checked-out tree, symlinks as links (compare with ls-tree)."""
    found = {}
    for dirpath, _dirs, names in os.walk(tree):
        for name in names:
            path = Path(dirpath, name)
            blob = os.readlink(path).encode() if path.is_symlink() else path.read_bytes()
            found[str(path.relative_to(tree))] = str(pygit2.hash(blob))
    return found


def reason_of(source: GitSource, spec: object) -> SourceError:
    with pytest.raises(SourceError) as caught:
        source.sync(spec)  # type: ignore[arg-type]
    return caught.value


def test_force_push_to_older_commit_gives_exactly_that_tree(
    file_remote: Remote, repo: TenantRepo, source: GitSource
) -> None:
    old = repo.commit(BASIC_LAYOUT, "old")
    source.sync(file_remote.spec())
    repo.commit({"confext/base/etc/extra": "new file\n", "units/more.service": "[Service]\n"})
    newest = source.sync(file_remote.spec())
    assert "more.service" in newest.layout.units

    repo.force_push(old)
    back = source.sync(file_remote.spec())
    assert back.commit == old
    assert back.forced_from == newest.commit, "a force-push is followed and reported"
    assert files_of(back.tree) == repo.tree_files(old)
    assert set(back.layout.units) == {"hello.service"}


def test_revert_brings_back_the_old_tree(
    file_remote: Remote, repo: TenantRepo, source: GitSource
) -> None:
    good = repo.commit(BASIC_LAYOUT, "good")
    bad = repo.commit({"confext/base/etc/motd": "broken\n", "units/x.timer": "[Timer]\n"})
    assert source.sync(file_remote.spec()).commit == bad
    reverted = repo.revert(bad)
    checkout = source.sync(file_remote.spec())
    assert checkout.commit == reverted and checkout.forced_from is None
    assert files_of(checkout.tree) == repo.tree_files(good)


def test_pinned_commit_and_tag(file_remote: Remote, repo: TenantRepo, source: GitSource) -> None:
    first = repo.commit(BASIC_LAYOUT, "first")
    repo.tag("v1.0", first)
    repo.tag("light", first, annotated=False)
    second = repo.commit({"confext/base/etc/motd": "two\n"})

    pinned = source.sync(file_remote.spec(ref={"commit": first}))
    assert (pinned.commit, pinned.ref) == (first, first)
    assert (pinned.tree / "confext/base/etc/motd").read_text() == "hello\n"

    for tag in ("v1.0", "light"):
        tagged = source.sync(file_remote.spec(ref={"tag": tag}))
        assert tagged.commit == first and tagged.revision == f"{tag}@sha1:{first}"
        assert source.remote_head(file_remote.spec(ref={"tag": tag}).source) == first  # type: ignore[arg-type]

    repo.tag("v1.0", second)  # a moved tag is followed too
    assert source.sync(file_remote.spec(ref={"tag": "v1.0"})).commit == second


def test_missing_branch_tag_and_unreachable_commit_are_ref_not_found(
    file_remote: Remote, repo: TenantRepo, source: GitSource
) -> None:
    repo.commit(BASIC_LAYOUT)
    for ref in ({"branch": "nope"}, {"tag": "v9"}, {"commit": "0" * 40}):
        error = reason_of(source, file_remote.spec(ref=ref))
        assert error.reason == "RefNotFound", error
        assert next(iter(ref.values())) in error.message


def test_commit_not_reachable_from_remote_refs_is_refused(
    file_remote: Remote, repo: TenantRepo, source: GitSource
) -> None:
    keep = repo.commit(BASIC_LAYOUT)
    orphan = repo.commit({"confext/base/etc/motd": "dropped\n"})
    repo.force_push(keep)
    git("reflog", "expire", "--expire=now", "--all", cwd=repo.bare)
    git("gc", "-q", "--prune=now", cwd=repo.bare)
    error = reason_of(source, file_remote.spec(ref={"commit": orphan}))
    assert error.reason == "RefNotFound" and "not reachable" in error.message


def test_a_new_url_does_not_see_commits_of_the_old_one(
    file_remote: Remote, repo: TenantRepo, source: GitSource, served: Path
) -> None:
    mine = repo.commit(BASIC_LAYOUT)
    assert source.sync(file_remote.spec(ref={"commit": mine})).commit == mine
    other = TenantRepo(served, "other.git")
    other.commit({"units/other.service": "[Service]\n"})
    error = reason_of(source, make_spec(other.file_url(), ref={"commit": mine}))
    assert error.reason == "RefNotFound"
    assert set(source.sync(make_spec(other.file_url())).layout.units) == {"other.service"}


def test_extension_release_id_must_match_the_image(
    file_remote: Remote, repo: TenantRepo, source: GitSource, config: ShimConfig
) -> None:
    rootfs = ImagePaths(config, "base").rootfs
    write_files(
        rootfs,
        {"usr/lib/os-release": "ID=debian\n", "etc/os-release": Link("../usr/lib/os-release")},
    )
    release = "sysext/tools/usr/lib/extension-release.d/extension-release.tools"
    repo.commit({**BASIC_LAYOUT, release: "ID=fedora\n"})
    error = reason_of(source, file_remote.spec())
    assert error.message.startswith(release) and "(ID=debian" in error.message
    good = repo.commit({release: "ID=debian\n"})
    assert source.sync(file_remote.spec()).commit == good

    # the image's os-release is read inside the image only: a link to the host's is not followed
    (rootfs / "usr/lib/os-release").unlink()
    (rootfs / "etc/os-release").unlink()
    (rootfs / "etc/os-release").symlink_to("/etc/os-release")
    unchecked = repo.commit({release: "ID=not-the-host\n"})
    assert source.sync(file_remote.spec()).commit == unchecked


def test_extension_systemd_would_refuse_makes_the_revision_refused(
    file_remote: Remote, repo: TenantRepo, source: GitSource, config: ShimConfig
) -> None:
    """The image's whole os-release is checked: levels and architecture, not only ID=."""
    rootfs = ImagePaths(config, "base").rootfs
    write_files(rootfs, {"etc/os-release": "ID=debian\nVERSION_ID=12\nSYSEXT_LEVEL=2\n"})
    release = "sysext/tools/usr/lib/extension-release.d/extension-release.tools"
    for text, rule in [
        ("ID=debian\nSYSEXT_LEVEL=3\n", "SYSEXT_LEVEL=3 does not match the OS (2)"),
        ("ID=debian\nSYSEXT_LEVEL=2\nARCHITECTURE=s390x\n", "ARCHITECTURE=s390x"),
        ("ID=debian\nVERSION_ID=11\n", "VERSION_ID=11 does not match the OS (12)"),
    ]:
        bad = repo.commit({**BASIC_LAYOUT, release: text})
        error = reason_of(source, file_remote.spec())
        assert isinstance(error, LayoutError) and error.reason == "InvalidRevision"
        assert error.message.startswith(release) and rule in error.message, error.message
        assert error.revision == f"main@sha1:{bad}"
    good = repo.commit({release: "ID=debian\nSYSEXT_LEVEL=2\n"})
    assert source.sync(file_remote.spec()).commit == good


def test_closed_port_is_source_unreachable_quickly(source: GitSource) -> None:
    port = closed_port()
    for url in (f"git://127.0.0.1:{port}/x.git", f"http://127.0.0.1:{port}/x.git"):
        error = reason_of(source, make_spec(url))
        assert error.reason == "SourceUnreachable", error
        assert url in error.message


def test_silent_server_is_source_unreachable_within_the_timeout(
    paths: TenantPaths, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A server that accepts and then says nothing: the read timeout ends the wait."""
    monkeypatch.setattr(source_module, "IO_TIMEOUT_MS", 500)
    source = GitSource(paths, paths.config)
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(4)
        port = silent.getsockname()[1]
        started = time.monotonic()
        error = reason_of(source, make_spec(f"git://127.0.0.1:{port}/x.git"))
    assert error.reason == "SourceUnreachable" and "timed out" in error.message
    assert time.monotonic() - started < 10
    monkeypatch.undo()
    GitSource(paths, paths.config)  # libgit2's timeouts are global: back to the defaults


def test_file_url_outside_allowed_roots_is_refused(
    source: GitSource, tmp_path: Path, paths: TenantPaths
) -> None:
    outside = TenantRepo(tmp_path / "elsewhere")
    outside.commit(BASIC_LAYOUT)
    for url in (
        outside.file_url(),
        "file:///etc",
        f"file://{paths.config.state_dir}/../served/../elsewhere/tenant.git",
    ):
        error = reason_of(source, make_spec(url))
        assert error.reason == "SourceNotAllowed", url


def test_another_tenants_mirror_is_refused_even_below_an_allowed_root(
    repo: TenantRepo, tmp_path: Path
) -> None:
    """A root that contains the shim's dirs (e.g. --file-source-root /var/lib) still never
    lets one tenant fetch another's mirror (fetched maybe with that tenant's credentials)."""
    config = ShimConfig(
        state_dir=tmp_path / "state", runtime_dir=tmp_path / "run", file_source_roots=(tmp_path,)
    )
    first = repo.commit(BASIC_LAYOUT)
    victim = GitSource(TenantPaths(config, "victim"), config)
    assert victim.sync(make_spec(repo.file_url())).commit == first
    mirror = TenantPaths(config, "victim").repo
    (tmp_path / "served" / "alias.git").symlink_to(mirror)
    (tmp_path / "run").mkdir()
    thief = GitSource(TenantPaths(config, "thief"), config)
    for url in (
        f"file://{mirror}",
        f"file://{tmp_path}/served/../state/tenants/victim/repo.git",
        f"file://{tmp_path}/served/alias.git",
        f"file://{tmp_path}/run",
    ):
        assert reason_of(thief, make_spec(url)).reason == "SourceNotAllowed", url
        with pytest.raises(SourceError, match="never a tenant source"):
            thief.remote_head(make_spec(url).source)  # type: ignore[arg-type]
    assert not TenantPaths(config, "thief").root.exists()
    assert thief.sync(make_spec(repo.file_url())).commit == first, "the root itself is fine"


@pytest.mark.parametrize("kind", ["file", "git", "http"])
def test_a_fetch_over_the_size_limit_is_aborted(
    kind: str, repo: TenantRepo, served: Path, paths: TenantPaths, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A remote serving more than MAX_FETCH_BYTES cannot fill the state disk."""
    monkeypatch.setattr(source_module, "MAX_FETCH_BYTES", 256 << 10)
    repo.commit({**BASIC_LAYOUT, "blob.bin": os.urandom(1 << 20)})  # incompressible
    for remote in serve(kind, repo, served):
        error = reason_of(GitSource(paths, paths.config), remote.spec())
        assert error.reason == "SourceTooLarge" and "exceeds 0.25 MiB" in error.message, error
    packs = list((paths.repo / "objects/pack").iterdir())
    assert sum(p.stat().st_size for p in packs) < 256 << 10, "no partial pack is kept"
    assert not paths.revisions.exists()


def test_a_fetch_past_its_deadline_is_aborted(
    repo: TenantRepo, served: Path, paths: TenantPaths, monkeypatch: pytest.MonkeyPatch
) -> None:
    """However slowly a server sends, one fetch ends by MAX_FETCH_SECONDS."""
    monkeypatch.setattr(source_module, "MAX_FETCH_SECONDS", 0.0)
    repo.commit(BASIC_LAYOUT)
    for remote in serve("http", repo, served):
        error = reason_of(GitSource(paths, paths.config), remote.spec())
        assert error.reason == "SourceTooSlow" and "longer than 0 s" in error.message, error


def test_corrupt_local_objects_are_recovered_by_recloning(
    file_remote: Remote,
    repo: TenantRepo,
    source: GitSource,
    paths: TenantPaths,
    caplog: pytest.LogCaptureFixture,
) -> None:
    first = repo.commit(BASIC_LAYOUT)
    source.sync(file_remote.spec())
    for obj in (paths.repo / "objects").rglob("*"):
        if obj.is_file() and obj.parent.name != "info":
            obj.chmod(0o644)
            obj.write_bytes(b"garbage")
    for rev in paths.revisions.iterdir():
        shutil.rmtree(rev)
    with caplog.at_level(logging.WARNING):
        checkout = source.sync(file_remote.spec())
    assert "re-cloning" in caplog.text
    assert checkout.commit == first
    assert files_of(checkout.tree) == repo.tree_files(first)


def test_corrupt_remote_is_corrupt_repository(
    file_remote: Remote, repo: TenantRepo, source: GitSource, caplog: pytest.LogCaptureFixture
) -> None:
    repo.commit(BASIC_LAYOUT)
    blob = git("rev-parse", "HEAD:confext/base/etc/motd", cwd=repo.work)
    loose = repo.bare / "objects" / blob[:2] / blob[2:]
    loose.chmod(0o644)
    loose.write_bytes(b"not zlib")
    with caplog.at_level(logging.WARNING):
        error = reason_of(source, file_remote.spec())
    assert error.reason == "CorruptRepository", error
    assert "re-cloning" not in caplog.text, "a corrupt remote is not a reason to drop our copy"


@pytest.fixture
def ssh_remote(repo: TenantRepo, served: Path) -> Iterator[Remote]:
    yield from serve("ssh", repo, served)


def test_ssh_host_key_is_always_checked(
    ssh_remote: Remote, repo: TenantRepo, source: GitSource, tmp_path: Path
) -> None:
    repo.commit(BASIC_LAYOUT)
    good = ssh_remote.credentials
    assert good is not None and good.ssh_known_hosts is not None
    _, other_host = ssh_keygen(tmp_path / "other_host")
    host = good.ssh_known_hosts.split()[0]
    for known in (f"{host} {other_host}", f"[127.0.0.2]:1 {other_host}"):
        creds = GitCredentials(ssh_private_key=good.ssh_private_key, ssh_known_hosts=known)
        error = reason_of(source, make_spec(ssh_remote.url, credentials=creds))
        assert error.reason == "AuthenticationFailed" and "host key" in error.message


def test_ssh_unknown_user_key_is_authentication_failed(
    ssh_remote: Remote, repo: TenantRepo, source: GitSource, tmp_path: Path
) -> None:
    repo.commit(BASIC_LAYOUT)
    assert ssh_remote.credentials is not None
    stranger, _ = ssh_keygen(tmp_path / "stranger")
    creds = GitCredentials(
        ssh_private_key=stranger, ssh_known_hosts=ssh_remote.credentials.ssh_known_hosts
    )
    error = reason_of(source, make_spec(ssh_remote.url, credentials=creds))
    assert error.reason == "AuthenticationFailed"
    assert "PRIVATE KEY" not in error.message and stranger.split()[-4] not in error.message


def test_credential_files_are_private_and_removed(
    ssh_remote: Remote, repo: TenantRepo, source: GitSource, paths: TenantPaths
) -> None:
    commit = repo.commit(BASIC_LAYOUT)
    assert source.sync(ssh_remote.spec()).commit == commit
    assert stat.S_IMODE(paths.credentials.stat().st_mode) == 0o700
    files = [p for p in paths.credentials.rglob("*") if p.is_file()]
    assert files, "known_hosts is written for libgit2"
    for path in paths.credentials.rglob("*"):
        mode = stat.S_IMODE(path.lstat().st_mode)
        assert mode == (0o700 if path.is_dir() else 0o600), path
    key = ssh_remote.credentials.ssh_private_key.get_secret_value()  # type: ignore[union-attr]
    assert all(key not in p.read_text() for p in files), "the private key stays in memory"

    source.remove()
    assert not paths.repo.exists() and not paths.revisions.exists()
    assert not paths.credentials.exists()


def test_prune_keeps_only_the_given_revisions(
    file_remote: Remote, repo: TenantRepo, source: GitSource, paths: TenantPaths
) -> None:
    first = repo.commit(BASIC_LAYOUT)
    source.sync(file_remote.spec())
    second = repo.commit({"confext/base/etc/motd": "2\n"})
    source.sync(file_remote.spec())
    (paths.revisions / ".tmp-leftover").mkdir()
    source.prune({second})
    assert sorted(p.name for p in paths.revisions.iterdir()) == [second]
    assert not paths.revision(first).exists()
