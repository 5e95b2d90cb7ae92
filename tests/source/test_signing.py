"""Signed commits: only a commit signed by a trusted key is ever checked out."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pygit2
import pytest

from bitbuilder.hostshim.api import VerifySpec
from bitbuilder.hostshim.errors import SourceError
from bitbuilder.hostshim.paths import TenantPaths
from bitbuilder.hostshim.source.git import GitSource
from bitbuilder.hostshim.source.signing import verify_commit
from tests.helpers.gitserve import Signer, TenantRepo, gpg_signer, ssh_signer
from tests.source.conftest import BASIC_LAYOUT, Remote


@pytest.fixture(scope="module")
def gpg_keys() -> Iterator[tuple[Signer, Signer]]:
    """Two OpenPGP keys (trusted, stranger); generated once: key generation is the slow part."""
    with gpg_signer("Trusted") as trusted, gpg_signer("Stranger") as stranger:
        yield trusted, stranger


def verify(*signers: Signer) -> dict[str, Any]:
    return {
        "ssh_keys": [s.public_key for s in signers if s.public_key.startswith("ssh-")],
        "gpg_keys": [s.public_key for s in signers if not s.public_key.startswith("ssh-")],
    }


def refused(source: GitSource, spec: Any, paths: TenantPaths, commit: str) -> SourceError:
    with pytest.raises(SourceError) as caught:
        source.sync(spec)
    assert caught.value.reason == "UnverifiedCommit"
    assert commit in caught.value.message
    assert caught.value.revision == f"main@sha1:{commit}"
    assert not paths.revision(commit).exists(), "an unverified commit is never checked out"
    return caught.value


def test_ssh_signed_commit_is_accepted_unsigned_and_untrusted_refused(
    file_remote: Remote, repo: TenantRepo, source: GitSource, paths: TenantPaths, tmp_path: Path
) -> None:
    trusted, stranger = ssh_signer(tmp_path / "k", "trusted"), ssh_signer(tmp_path / "k", "other")
    spec = file_remote.spec(verify=verify(trusted))
    good = repo.commit(BASIC_LAYOUT, "signed", signer=trusted)
    assert source.sync(spec).commit == good

    unsigned = repo.commit({"confext/base/etc/motd": "unsigned\n"})
    assert "not signed" in refused(source, spec, paths, unsigned).message

    untrusted = repo.commit({"confext/base/etc/motd": "x\n"}, signer=stranger)
    assert "untrusted SSH key SHA256:" in refused(source, spec, paths, untrusted).message


def test_gpg_signed_commit_is_accepted_and_untrusted_refused(
    file_remote: Remote,
    repo: TenantRepo,
    source: GitSource,
    paths: TenantPaths,
    gpg_keys: tuple[Signer, Signer],
) -> None:
    trusted, stranger = gpg_keys
    spec = file_remote.spec(verify=verify(trusted))
    good = repo.commit(BASIC_LAYOUT, "signed", signer=trusted)
    checkout = source.sync(spec)
    assert checkout.commit == good and (checkout.tree / "units/hello.service").is_file()

    untrusted = repo.commit({"confext/base/etc/motd": "x\n"}, signer=stranger)
    assert "untrusted OpenPGP key" in refused(source, spec, paths, untrusted).message
    unsigned = repo.commit({"confext/base/etc/motd": "y\n"})
    refused(source, spec, paths, unsigned)


def test_key_rotation(
    file_remote: Remote, repo: TenantRepo, source: GitSource, paths: TenantPaths, tmp_path: Path
) -> None:
    old_key, new_key = ssh_signer(tmp_path / "k", "old"), ssh_signer(tmp_path / "k", "new")
    old_signed = repo.commit(BASIC_LAYOUT, "by old key", signer=old_key)
    assert source.sync(file_remote.spec(verify=verify(old_key))).commit == old_signed

    both = file_remote.spec(verify=verify(old_key, new_key))  # rotation: trust both for a while
    assert source.sync(both).commit == old_signed
    new_signed = repo.commit({"confext/base/etc/motd": "rotated\n"}, signer=new_key)
    assert source.sync(both).commit == new_signed

    only_new = file_remote.spec(verify=verify(new_key))
    assert source.sync(only_new).commit == new_signed
    repo.force_push(old_signed)  # the head is signed by the retired key again
    with pytest.raises(SourceError) as caught:
        source.sync(only_new)
    assert caught.value.reason == "UnverifiedCommit" and old_signed in caught.value.message


def test_tampered_signature_is_refused(tmp_path: Path) -> None:
    """A valid signature over other content does not verify this commit's payload."""
    signer = ssh_signer(tmp_path / "k")
    repo = TenantRepo(tmp_path / "r")
    commit = repo.commit(BASIC_LAYOUT, signer=signer)
    signed = pygit2.Repository(str(repo.bare))[commit]
    assert isinstance(signed, pygit2.Commit)
    signature, payload = signed.gpg_signature
    spec = VerifySpec(ssh_keys=[signer.public_key])
    assert verify_commit(commit, (signature, payload), spec).startswith("ssh key SHA256:")
    with pytest.raises(SourceError, match="bad SSH signature"):
        verify_commit(commit, (signature, payload.replace(b"change", b"chance")), spec)
    with pytest.raises(SourceError, match="not an SSH public key"):
        verify_commit(commit, (signature, payload), VerifySpec(ssh_keys=["cert-authority x y"]))
