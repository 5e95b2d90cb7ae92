"""Tenant -> MachineSpec: quantities, secrets into credentials and trusted keys, errors."""

from __future__ import annotations

import asyncio
from decimal import Decimal
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import ValidationError

from bitbuilder.hostshim.api import ImageVerify, MachineSpec
from bitbuilder.operator.api import validation_message
from bitbuilder.operator.translate import (
    FileSecrets,
    SecretNotFound,
    TenantSecrets,
    TranslateError,
    credentials_from_secret,
    image_spec,
    load_secrets,
    to_machine_spec,
    verify_from_secret,
)
from tests.operator_core.conftest import make_tenant

SSH_KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIBvQ8Ljs9J8wQ7lq7fC2Q0mX6nXo3v9uQ2h0cE1b2d3e alice"
GPG_KEY = "-----BEGIN PGP PUBLIC KEY BLOCK-----\n\nmQINBGV...\n-----END PGP PUBLIC KEY BLOCK-----\n"


def test_plain_fields_carry_over() -> None:
    tenant = make_tenant(
        "db",
        runtime="vmspawn",
        suspend=True,
        keepDataOnDelete=True,
        extensions=[{"name": "tools", "type": "sysext"}],
        repoSettings=["hostname"],
        network={"mode": "none"},
    )
    spec = to_machine_spec(tenant)
    assert spec.name == "db"
    assert spec.runtime == "vmspawn"
    assert spec.image == "base"
    assert spec.suspend and spec.keep_data_on_delete
    assert spec.extensions is not None and spec.extensions[0].name == "tools"
    assert spec.repo_settings == ["hostname"]
    assert spec.network.mode == "none"
    assert spec.source is not None and spec.source.ref.branch == "main"
    assert spec.source.credentials is None and spec.source.verify is None


@pytest.mark.parametrize(
    ("resources", "expected"),
    [
        ({"cpu": "500m"}, {"cpu_millis": 500}),
        ({"cpu": 2}, {"cpu_millis": 2000}),
        ({"cpu": "1.5"}, {"cpu_millis": 1500}),
        ({"memory": "512Mi"}, {"memory_bytes": 512 * 2**20}),
        ({"memory": "1G"}, {"memory_bytes": 10**9}),
        ({"memory": "1e9"}, {"memory_bytes": 10**9}),
        ({"disk": "10Gi"}, {"disk_bytes": 10 * 2**30}),
        ({"tasks": 64}, {"tasks": 64}),
        ({}, {}),
    ],
)
def test_quantities_become_plain_units(
    resources: dict[str, object], expected: dict[str, int]
) -> None:
    limits = to_machine_spec(make_tenant(resources=resources)).resources
    got = {k: v for k, v in limits.model_dump().items() if v is not None}
    assert got == expected


@given(st.integers(min_value=16, max_value=2**20))
def test_memory_in_mebibytes_is_exact(mib: int) -> None:
    limits = to_machine_spec(make_tenant(resources={"memory": f"{mib}Mi"})).resources
    assert limits.memory_bytes == mib * 2**20


@given(st.integers(min_value=10, max_value=1_024_000))
def test_cpu_millis_round_trip(millis: int) -> None:
    limits = to_machine_spec(make_tenant(resources={"cpu": f"{millis}m"})).resources
    assert limits.cpu_millis == millis
    assert Decimal(limits.cpu_millis) / 1000 == Decimal(millis) / 1000


@pytest.mark.parametrize(
    ("resources", "message"),
    [
        ({"cpu": "1m"}, "resources.cpu '1m' is out of range: give 10m to 1024000m"),
        ({"memory": "1Mi"}, "resources.memory '1Mi' is out of range: give 16Mi to 1Pi"),
        ({"disk": "1Mi"}, "resources.disk '1Mi' is out of range: give 64Mi to 1Pi"),
        ({"memory": "2Pi"}, "resources.memory '2Pi' is out of range: give 16Mi to 1Pi"),
    ],
)
def test_out_of_range_resources_are_refused_in_the_tenants_own_terms(
    resources: dict[str, str], message: str
) -> None:
    """Refused by the Tenant model with the user's field and units, never the shim's
    memory_bytes (it used to surface as 'SourceReady Unknown' with internal names)."""
    with pytest.raises(ValidationError) as err:
        make_tenant(resources=resources)
    text = validation_message(err.value)
    assert message in text and "_bytes" not in text and "_millis" not in text


def test_basic_auth_credentials_reach_only_the_request_body() -> None:
    tenant = make_tenant(
        source={"url": "https://g/x.git", "ref": {"tag": "v1"}, "secretRef": {"name": "git"}}
    )
    secrets = TenantSecrets(credentials={"username": b"bob\n", "password": b"s3cret\n"})
    spec = to_machine_spec(tenant, secrets)
    assert spec.source is not None and spec.source.credentials is not None
    assert spec.source.credentials.username == "bob"
    assert "s3cret" not in repr(spec) and "s3cret" not in str(spec.wire())
    sent = MachineSpec.model_validate(spec.wire_secret())  # what the client PUTs
    assert sent.source is not None and sent.source.credentials is not None
    password = sent.source.credentials.password
    assert password is not None and password.get_secret_value() == "s3cret"


def test_token_without_username_uses_a_placeholder_user() -> None:
    creds = credentials_from_secret({"token": b"tok"}, "git")
    assert creds.username == "git"
    assert creds.password is not None and creds.password.get_secret_value() == "tok"


def test_ssh_credentials_need_known_hosts() -> None:
    creds = credentials_from_secret(
        {
            "identity": b"-----BEGIN OPENSSH PRIVATE KEY-----\nx\n",
            "known_hosts": b"host ssh-ed25519 AAAA",
        },
        "git",
    )
    assert creds.ssh_private_key is not None and creds.ssh_known_hosts == "host ssh-ed25519 AAAA"
    with pytest.raises(TranslateError) as err:
        credentials_from_secret({"ssh-privatekey": b"KEY"}, "git")
    assert err.value.reason == "InvalidSecret" and "known" in err.value.message.lower()
    assert "KEY" not in err.value.message


@pytest.mark.parametrize("data", [{}, {"username": b"u"}, {"other": b"x"}])
def test_credentials_secret_without_usable_keys(data: dict[str, bytes]) -> None:
    with pytest.raises(TranslateError) as err:
        credentials_from_secret(data, "git")
    assert "'username'+'password'" in err.value.message


def test_non_text_secret_value_is_refused() -> None:
    with pytest.raises(TranslateError) as err:
        credentials_from_secret({"username": b"u", "password": b"\xff\xfe"}, "git")
    assert err.value.reason == "InvalidSecret" and "'password'" in err.value.message


def test_verify_keys_by_file_suffix() -> None:
    data = {
        "alice.pub": f"# team keys\n{SSH_KEY}\n\n{SSH_KEY.replace('alice', 'bob')}\n".encode(),
        "release.asc": GPG_KEY.encode(),
        "README": b"ignored",
    }
    verify = verify_from_secret(data, "keys")
    assert verify.ssh_keys == [SSH_KEY, SSH_KEY.replace("alice", "bob")]
    assert verify.gpg_keys == [GPG_KEY]


@pytest.mark.parametrize(
    ("data", "words"),
    [
        ({"README": b"x"}, "no '*.pub'"),
        ({"k.gpg": b"\x99\x01binary"}, "not text"),
        ({"k.asc": b"junk"}, "armoured"),
    ],
)
def test_verify_secret_problems(data: dict[str, bytes], words: str) -> None:
    with pytest.raises(TranslateError) as err:
        verify_from_secret(data, "keys")
    assert words in err.value.message


def test_verify_reaches_the_spec() -> None:
    tenant = make_tenant(
        source={
            "url": "https://g/x.git",
            "ref": {"branch": "main"},
            "verify": {"secretRef": {"name": "keys"}},
        }
    )
    spec = to_machine_spec(tenant, TenantSecrets(verify={"a.pub": SSH_KEY.encode()}))
    assert spec.source is not None and spec.source.verify is not None
    assert spec.source.verify.ssh_keys == [SSH_KEY]
    with pytest.raises(SecretNotFound):
        to_machine_spec(tenant)


def test_file_secrets_read_one_file_per_key(tmp_path: Path) -> None:
    (tmp_path / "git").mkdir()
    (tmp_path / "git" / "username").write_text("bob")
    (tmp_path / "git" / "password").write_text("pw")
    (tmp_path / "git" / ".hidden").write_text("no")
    tenant = make_tenant(
        source={"url": "https://g/x.git", "ref": {"branch": "main"}, "secretRef": {"name": "git"}}
    )
    loaded = asyncio.run(load_secrets(tenant, FileSecrets(tmp_path)))
    assert loaded.credentials == {"username": b"bob", "password": b"pw"}
    assert loaded.verify is None


@pytest.mark.parametrize("root", [None, "missing"])
def test_missing_file_secret(tmp_path: Path, root: str | None) -> None:
    tenant = make_tenant(
        source={"url": "https://g/x.git", "ref": {"branch": "main"}, "secretRef": {"name": "git"}}
    )
    resolver = FileSecrets(None if root is None else tmp_path / root)
    with pytest.raises(SecretNotFound) as err:
        asyncio.run(load_secrets(tenant, resolver))
    assert err.value.reason == "SecretNotFound" and "'git'" in err.value.message


def test_tenant_without_source_needs_no_secrets() -> None:
    tenant = make_tenant(source=None)
    assert asyncio.run(load_secrets(tenant, FileSecrets(None))) == TenantSecrets()
    assert to_machine_spec(tenant).source is None


def test_image_import_only_for_urls() -> None:
    assert image_spec(make_tenant()) is None
    sha = "c" * 64
    wanted = image_spec(
        make_tenant(image={"name": "deb", "url": "https://i/deb.tar", "sha256": sha})
    )
    assert wanted is not None and wanted.url == "https://i/deb.tar" and wanted.sha256 == sha


def test_image_with_signature_verification_needs_no_digest() -> None:
    image = {"name": "deb", "url": "https://i/deb.raw", "verify": "signature"}
    wanted = image_spec(make_tenant(image=image))
    assert wanted is not None and wanted.verify == ImageVerify.signature and wanted.sha256 is None
    for bad, message in (
        ({"name": "deb", "url": "https://i/deb.raw"}, "image.sha256 or image.verify: signature"),
        ({"name": "deb", "verify": "signature"}, "image.verify needs image.url"),
    ):
        with pytest.raises(ValidationError, match=message):
            make_tenant(image=bad)
