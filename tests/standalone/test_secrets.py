"""secretRefs in standalone mode: credentials and trusted keys from `--secrets-dir` files."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tests.helpers.gitserve import http_server, ssh_signer, sshd
from tests.helpers.wait import wait_for
from tests.standalone.conftest import REAL_HOST, Host, motd, tenant_manifest

pytestmark = REAL_HOST
PASSWORD = "pw-s3cret-never-shown"


def write_secret(folder: Path, name: str, data: dict[str, str]) -> None:
    (folder / name).mkdir(parents=True, exist_ok=True)
    for key, value in data.items():
        (folder / name / key).write_text(value)


def test_basic_auth_from_a_secret_folder(host: Host, tmp_path: Path) -> None:
    secrets = tmp_path / "secrets"
    secrets.mkdir()
    commit = host.tenant_repo("web", "web v1").head()
    with http_server(host.git.base, auth=("bob", PASSWORD)) as http:
        source = {"url": http.url("web.git"), "ref": {"branch": "main"}, "interval": "1s",
                  "secretRef": {"name": "web-git"}}  # fmt: skip
        host.commit_fleet({"web.yaml": tenant_manifest("web", "", source=source)})
        host.start_reconciler(secrets=secrets)
        wait_for(
            lambda: host.condition("web", "Stalled") is not None, timeout=30, what="first status"
        )
        assert host.condition("web", "Stalled")[:2] == ("True", "SecretNotFound")  # type: ignore[index]
        assert host.machine("web") is None

        write_secret(secrets, "web-git", {"username": "bob", "password": PASSWORD})
        host.wait_applied("web", commit)
        assert host.motd("web") == "web v1"
        assert host.condition("web", "Ready")[0] == "True"  # type: ignore[index]
    for path in [*host.state.root.rglob("*"), host.procs.logs / "reconciler.log"]:
        if path.is_file():
            assert PASSWORD not in path.read_text(errors="replace"), path


def test_only_trusted_signed_commits_run(host: Host, tmp_path: Path) -> None:
    secrets = tmp_path / "secrets"
    signer = ssh_signer(tmp_path / "keys")
    write_secret(secrets, "web-keys", {"release.pub": signer.public_key + "\n"})
    repo = host.tenant_repo("web", "unsigned start")
    signed = repo.commit(motd("web signed"), "signed", signer=signer)
    source = {"url": host.url("web"), "ref": {"branch": "main"}, "interval": "1s",
              "verify": {"secretRef": {"name": "web-keys"}}}  # fmt: skip
    host.commit_fleet({"web.yaml": tenant_manifest("web", "", source=source)})
    host.start_reconciler(secrets=secrets)
    host.wait_applied("web", signed)
    assert host.motd("web") == "web signed"

    unsigned = repo.commit(motd("web unsigned"), "not signed")
    wait_for(
        lambda: (c := host.condition("web", "SourceReady")) is not None and c[0] == "False",
        timeout=30,
        what="the unsigned commit refused",
    )
    _, _, message = host.condition("web", "SourceReady")  # type: ignore[misc]
    assert unsigned in message and f"still running main@sha1:{signed}" in message
    assert host.condition("web", "Stalled")[0] == "True"  # type: ignore[index]
    assert host.applied("web") == signed and host.motd("web") == "web signed"


@pytest.mark.skipif(shutil.which("/usr/sbin/sshd") is None, reason="needs openssh-server")
def test_ssh_identity_and_known_hosts_from_a_secret_folder(host: Host, tmp_path: Path) -> None:
    commit = host.tenant_repo("web", "web over ssh").head()
    with sshd(host.git.base) as (server, keys):
        secrets = tmp_path / "secrets"
        write_secret(
            secrets, "web-ssh", {"identity": keys.private_key, "known_hosts": keys.known_hosts}
        )
        source = {"url": server.url("web.git"), "ref": {"branch": "main"}, "interval": "1h",
                  "secretRef": {"name": "web-ssh"}}  # fmt: skip
        host.commit_fleet({"web.yaml": tenant_manifest("web", "", source=source)})
        host.start_reconciler(secrets=secrets)
        host.wait_applied("web", commit)
        assert host.motd("web") == "web over ssh"
    key_body = keys.private_key.splitlines()[1]
    for path in [*host.state.root.rglob("*"), host.procs.logs / "reconciler.log"]:
        if path.is_file():
            assert key_body not in path.read_text(errors="replace"), path
