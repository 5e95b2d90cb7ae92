"""Reading Tenant manifests from a fleet folder or git repo."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from pydantic import SecretStr

from bitbuilder.hostshim.api import GitCredentials, VerifySpec
from bitbuilder.operator.cli import main
from bitbuilder.operator.fleet import FleetError, FolderFleet, GitFleet, open_fleet, read_fleet
from bitbuilder.operator.localstate import LocalState
from tests.helpers.gitserve import TenantRepo, git, gpg_signer, http_server, ssh_signer
from tests.operator_core.conftest import tenant_object


def write(path: Path, *docs: object) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump_all(docs))


def test_plain_folder_multi_doc_and_other_kinds(tmp_path: Path) -> None:
    namespace = {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "x"}}
    write(tmp_path / "a.yaml", tenant_object("a"), namespace, tenant_object("b"))
    write(tmp_path / "sub" / "c.yml", tenant_object("c"))
    write(tmp_path / ".hidden" / "d.yaml", tenant_object("d"))
    (tmp_path / "notes.txt").write_text("kind: Tenant")
    snap = read_fleet(tmp_path, "r1")
    assert sorted(snap.tenants) == ["a", "b", "c"]
    assert snap.problems == []


def test_bad_manifest_is_reported_and_others_kept(tmp_path: Path) -> None:
    bad = tenant_object("broken", resources={"cpu": "lots"})
    write(tmp_path / "t.yaml", tenant_object("good"), bad)
    (tmp_path / "junk.yaml").write_text("kind: [unclosed")
    snap = read_fleet(tmp_path, "r1")
    assert list(snap.tenants) == ["good"]
    messages = [str(p) for p in snap.problems]
    assert any("t.yaml (document 2) (tenant 'broken')" in m and "cpu" in m for m in messages)
    assert any(m.startswith("junk.yaml") and "YAML" in m for m in messages)
    assert snap.broken_names == {"broken"}


def test_a_typo_in_kind_or_version_is_a_problem_not_another_kind(tmp_path: Path) -> None:
    """Ignored, such a manifest would remove its tenant; another group's Tenant is not ours."""
    old_version = {**tenant_object("web"), "apiVersion": "bitbuilder.io/v1"}
    typo = {**tenant_object("db"), "kind": "Tennant"}
    capsule = {**tenant_object("team"), "apiVersion": "capsule.clastix.io/v1beta2"}
    write(tmp_path / "t.yaml", old_version, typo, capsule)
    snap = read_fleet(tmp_path, "r1")
    assert snap.tenants == {} and snap.broken_names == {"web", "db"}
    messages = [str(p) for p in snap.problems]
    assert "apiVersion" in messages[0] and "bitbuilder.io/v1alpha1" in messages[0]
    assert "kind" in messages[1] and len(messages) == 2


def test_a_duplicated_name_applies_neither_manifest(tmp_path: Path) -> None:
    """A second file naming a running tenant must not take it over (by sorting first)."""
    write(tmp_path / "web.yaml", tenant_object("web"))
    write(tmp_path / "another.yaml", tenant_object("web", suspend=True), tenant_object("db"))
    snap = read_fleet(tmp_path, "r1")
    assert list(snap.tenants) == ["db"]
    assert snap.broken_names == {"web"}, "the machine of 'web' is kept, not removed"
    messages = sorted(str(p) for p in snap.problems)
    assert messages == [
        "another.yaml (document 1) (tenant 'web'): duplicate tenant name (also in web.yaml "
        "(document 1)): neither is applied",
        "web.yaml (document 1) (tenant 'web'): duplicate tenant name (also in another.yaml "
        "(document 1)): neither is applied",
    ]


def test_status_in_a_manifest_is_ignored(tmp_path: Path) -> None:
    obj = tenant_object("a")
    obj["status"] = {"phase": "Running", "bogus": 1}
    write(tmp_path / "a.yaml", obj)
    snap = read_fleet(tmp_path, "r1")
    assert snap.tenants["a"].status is None


def test_kustomization_resources(tmp_path: Path) -> None:
    write(tmp_path / "tenants" / "a.yaml", tenant_object("a"))
    write(tmp_path / "tenants" / "b.yaml", tenant_object("b"))
    write(tmp_path / "tenants" / "unlisted.yaml", tenant_object("unlisted"))
    write(tmp_path / "more" / "c.yaml", tenant_object("c"))
    write(tmp_path / "more" / "kustomization.yaml", {"resources": ["c.yaml"]})
    write(
        tmp_path / "kustomization.yaml",
        {
            "resources": [
                "tenants/a.yaml",
                "tenants/b.yaml",
                "more",
                "missing.yaml",
                "../x.yaml",
                "https://h/x",
            ]
        },
    )
    snap = read_fleet(tmp_path, "r1")
    assert sorted(snap.tenants) == ["a", "b", "c"]
    assert len(snap.problems) == 3


def test_missing_folder_is_a_fleet_error(tmp_path: Path) -> None:
    with pytest.raises(FleetError):
        FolderFleet(tmp_path / "nope").snapshot()


def test_folder_revision_follows_content(tmp_path: Path) -> None:
    fleet = FolderFleet(tmp_path)
    write(tmp_path / "a.yaml", tenant_object("a"))
    first = fleet.head()
    assert fleet.head() == first
    write(tmp_path / "a.yaml", tenant_object("a", suspend=True))
    assert fleet.head() != first


def test_git_fleet_follows_the_branch(tmp_path: Path) -> None:
    repo = tmp_path / "fleet"
    repo.mkdir()
    git("init", "-q", "-b", "main", cwd=repo)
    write(repo / "tenants" / "a.yaml", tenant_object("a"))
    (repo / "tenants" / "link.yaml").symlink_to("/etc/passwd")
    git("add", ".", cwd=repo)
    git("commit", "-qm", "one", cwd=repo)
    fleet = open_fleet(f"file://{repo}", tmp_path / "work", "main", "tenants")
    assert isinstance(fleet, GitFleet)
    first = fleet.snapshot()
    assert first.revision == git("rev-parse", "HEAD", cwd=repo)
    assert list(first.tenants) == ["a"]
    assert not (tmp_path / "work" / "trees" / first.revision / "tenants" / "link.yaml").exists()
    write(repo / "tenants" / "b.yaml", tenant_object("b"))
    git("add", ".", cwd=repo)
    git("commit", "-qm", "two", cwd=repo)
    second = fleet.snapshot()
    assert sorted(second.tenants) == ["a", "b"]
    assert [p.name for p in (tmp_path / "work" / "trees").iterdir()] == [second.revision]


def test_git_fleet_errors(tmp_path: Path) -> None:
    with pytest.raises(FleetError):
        GitFleet(f"file://{tmp_path}/missing.git", "main", tmp_path / "w").snapshot()
    repo = tmp_path / "r"
    repo.mkdir()
    git("init", "-q", "-b", "main", cwd=repo)
    (repo / "x").write_text("x")
    git("add", ".", cwd=repo)
    git("commit", "-qm", "x", cwd=repo)
    with pytest.raises(FleetError, match="no branch 'prod'"):
        GitFleet(f"file://{repo}", "prod", tmp_path / "w2").snapshot()


def fleet_repo(base: Path) -> TenantRepo:
    repo = TenantRepo(base, "fleet.git")
    repo.commit({"a.yaml": yaml.safe_dump(tenant_object("a"))}, "one")
    return repo


def test_private_fleet_over_https_basic_auth(tmp_path: Path) -> None:
    repo = fleet_repo(tmp_path / "git")
    with http_server(tmp_path / "git", auth=("ops", "fleet-pw")) as server:
        url = server.url("fleet.git")
        with pytest.raises(FleetError):
            GitFleet(url, "main", tmp_path / "anon").snapshot()
        creds = GitCredentials(username="ops", password=SecretStr("fleet-pw"))
        snap = open_fleet(url, tmp_path / "w", credentials=creds).snapshot()
        assert snap.revision == repo.head() and list(snap.tenants) == ["a"]


def test_ssh_fleet_credentials_are_refused(tmp_path: Path) -> None:
    creds = GitCredentials(ssh_private_key=SecretStr("KEY"), ssh_known_hosts="h k")
    with pytest.raises(FleetError, match="only username\\+password"):
        GitFleet("ssh://git@h/f.git", "main", tmp_path, credentials=creds)


def test_mirror_follows_a_changed_fleet_url(tmp_path: Path) -> None:
    first = fleet_repo(tmp_path / "one")
    second = TenantRepo(tmp_path / "two", "other-fleet.git")
    second.commit({"b.yaml": yaml.safe_dump(tenant_object("b"))}, "other")
    assert list(GitFleet(first.file_url(), "main", tmp_path / "w").snapshot().tenants) == ["a"]
    assert list(GitFleet(second.file_url(), "main", tmp_path / "w").snapshot().tenants) == ["b"]


def test_run_refuses_a_bad_command_line(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    common = ["run", "--fleet", str(tmp_path), "--socket", str(tmp_path / "s.sock"),
              "--state-dir", str(tmp_path / "state")]  # fmt: skip
    assert main([*common, "--fleet-secret", "nope", "--secrets-dir", str(tmp_path)]) == 2
    assert "secret 'nope' not found" in caplog.text
    assert main([*common, "--webhook-listen", "127.0.0.1:0"]) == 2
    assert "--webhook-secret-file" in caplog.text


def test_one_reconciler_per_state_dir(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    state = LocalState(tmp_path / "state")
    with state.lock():
        argv = ["run", "--fleet", str(tmp_path), "--state-dir", str(state.root)]
        assert main(argv) == 2
        assert "another `bitbuilder run` uses" in caplog.text
    state.lock().close()  # free again once the holder is gone


def test_signed_fleet_ssh(tmp_path: Path) -> None:
    trusted, other = ssh_signer(tmp_path / "k1", "ops"), ssh_signer(tmp_path / "k2", "mallory")
    repo = TenantRepo(tmp_path / "git", "fleet.git")
    signed = repo.commit({"a.yaml": yaml.safe_dump(tenant_object("a"))}, "ok", signer=trusted)
    verify = VerifySpec(ssh_keys=[trusted.public_key])
    fleet = GitFleet(repo.file_url(), "main", tmp_path / "w", verify=verify)
    assert fleet.snapshot().revision == signed
    unsigned = repo.commit({"b.yaml": yaml.safe_dump(tenant_object("b"))}, "unsigned")
    with pytest.raises(FleetError, match=f"commit {unsigned} is not signed by a trusted key"):
        fleet.snapshot()
    repo.commit({"c.yaml": yaml.safe_dump(tenant_object("c"))}, "evil", signer=other)
    with pytest.raises(FleetError, match="not signed by a trusted key"):
        fleet.snapshot()
    assert [p.name for p in (tmp_path / "w" / "trees").iterdir()] == [signed]  # never materialised


def test_signed_fleet_openpgp(tmp_path: Path) -> None:
    with gpg_signer("Ops") as trusted:
        repo = TenantRepo(tmp_path / "git", "fleet.git")
        signed = repo.commit({"a.yaml": yaml.safe_dump(tenant_object("a"))}, "ok", signer=trusted)
    fleet = GitFleet(
        repo.file_url(), "main", tmp_path / "w", verify=VerifySpec(gpg_keys=[trusted.public_key])
    )
    assert list(fleet.snapshot().tenants) == ["a"] and fleet.snapshot().revision == signed
    repo.commit({"b.yaml": yaml.safe_dump(tenant_object("b"))}, "unsigned")
    with pytest.raises(FleetError, match="not signed by a trusted key"):
        fleet.snapshot()


def test_a_folder_cannot_be_verified(tmp_path: Path) -> None:
    with pytest.raises(FleetError, match="no signatures"):
        open_fleet(
            str(tmp_path), tmp_path / "w", verify=VerifySpec(ssh_keys=["ssh-ed25519 AAAA x"])
        )
