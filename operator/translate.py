"""Tenant -> MachineSpec: pure, plus the secret plumbing that feeds it.

Secrets come through a `SecretResolver`: the kopf driver reads cluster Secrets, the standalone
driver reads files `<secrets-dir>/<name>/<key>`. Either way the translation itself never does
I/O, so every rule here is unit-testable.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from pydantic import SecretStr, ValidationError

from bitbuilder.hostshim.api import (
    GitCredentials,
    ImageSpec,
    MachineSpec,
    ResourceLimits,
    SourceSpec,
    VerifySpec,
)
from bitbuilder.operator.api import Tenant, TenantSource

SecretData = Mapping[str, bytes]


class TranslateError(Exception):
    """The Tenant cannot become a MachineSpec; `reason` is a CamelCase status reason."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


class SecretNotFound(TranslateError):
    def __init__(self, name: str, where: str) -> None:
        super().__init__("SecretNotFound", f"secret {name!r} not found ({where})")


class SecretResolver(Protocol):
    """Where secretRefs are looked up. Raises SecretNotFound."""

    async def read(self, name: str) -> SecretData: ...


class FileSecrets:
    """Standalone secrets: a folder `<root>/<name>/` with one file per key."""

    def __init__(self, root: Path | None) -> None:
        self.root = root

    async def read(self, name: str) -> SecretData:
        folder = None if self.root is None else self.root / name
        if folder is None or not folder.is_dir():
            raise SecretNotFound(name, f"no folder {folder}" if folder else "no --secrets-dir")
        return {
            entry.name: entry.read_bytes()
            for entry in sorted(folder.iterdir())
            if entry.is_file() and not entry.name.startswith(".")
        }


@dataclass(frozen=True)
class TenantSecrets:
    """The secrets a tenant's spec refers to, already read."""

    credentials: SecretData | None = None
    verify: SecretData | None = None


async def load_secrets(tenant: Tenant, resolver: SecretResolver) -> TenantSecrets:
    return await load_source_secrets(tenant.spec.source, resolver)


async def load_source_secrets(
    source: TenantSource | None, resolver: SecretResolver
) -> TenantSecrets:
    """The secrets a source refers to (a Tenant's or a HostProfile's)."""
    if source is None:
        return TenantSecrets()
    creds = None if source.secret_ref is None else await resolver.read(source.secret_ref.name)
    verify = None if source.verify is None else await resolver.read(source.verify.secret_ref.name)
    return TenantSecrets(credentials=creds, verify=verify)


def _text(data: SecretData, key: str, secret: str) -> str:
    try:
        return data[key].decode()
    except UnicodeDecodeError as exc:
        raise TranslateError("InvalidSecret", f"secret {secret!r} key {key!r} is not text") from exc


def _invalid_secret(secret: str, exc: ValidationError) -> TranslateError:
    """pydantic's messages only: str(exc) would show the input, which may be the secret."""
    problems = "; ".join(str(e["msg"]) for e in exc.errors())
    return TranslateError("InvalidSecret", f"secret {secret!r}: {problems}")


def _first(data: SecretData, *keys: str) -> str | None:
    return next((k for k in keys if k in data), None)


def credentials_from_secret(data: SecretData, secret: str) -> GitCredentials:
    """Flux-style keys: username+password (or token) for https, identity+known_hosts for ssh.

    Also the kubernetes.io/ssh-auth key name `ssh-privatekey`. Values never reach messages.
    """
    identity = _first(data, "identity", "ssh-privatekey")
    password = _first(data, "password", "token", "bearerToken")
    try:
        if identity is not None:
            hosts = _first(data, "known_hosts", "knownHosts")
            return GitCredentials(
                ssh_private_key=SecretStr(_text(data, identity, secret)),
                ssh_known_hosts=None if hosts is None else _text(data, hosts, secret),
            )
        if password is not None:
            user = _text(data, "username", secret) if "username" in data else "git"
            return GitCredentials(
                username=user.strip(), password=SecretStr(_text(data, password, secret).strip())
            )
    except ValidationError as exc:
        raise _invalid_secret(secret, exc) from None
    raise TranslateError(
        "InvalidSecret",
        f"secret {secret!r} needs keys 'username'+'password' (https) or "
        "'identity'+'known_hosts' (ssh)",
    )


def verify_from_secret(data: SecretData, secret: str) -> VerifySpec:
    """'*.pub' files are SSH keys (one per line allowed); '*.asc'/'*.gpg' armoured OpenPGP."""
    ssh: list[str] = []
    gpg: list[str] = []
    for key in sorted(data):
        if key.endswith(".pub"):
            lines = _text(data, key, secret).splitlines()
            ssh.extend(line.strip() for line in lines if line.strip() and not line.startswith("#"))
        elif key.endswith((".asc", ".gpg")):
            armoured = _text(data, key, secret)
            if "-----BEGIN PGP PUBLIC KEY BLOCK-----" not in armoured:
                raise TranslateError(
                    "InvalidSecret", f"secret {secret!r} key {key!r} is not an armoured public key"
                )
            gpg.append(armoured)
    if not ssh and not gpg:
        raise TranslateError(
            "InvalidSecret", f"secret {secret!r} holds no '*.pub', '*.asc' or '*.gpg' keys"
        )
    try:
        return VerifySpec(ssh_keys=ssh, gpg_keys=gpg)
    except ValidationError as exc:
        raise _invalid_secret(secret, exc) from None


def source_spec(source: TenantSource, secrets: TenantSecrets) -> SourceSpec:
    credentials = verify = None
    if source.secret_ref is not None:
        if secrets.credentials is None:
            raise SecretNotFound(source.secret_ref.name, "not loaded")
        credentials = credentials_from_secret(secrets.credentials, source.secret_ref.name)
    if source.verify is not None:
        if secrets.verify is None:
            raise SecretNotFound(source.verify.secret_ref.name, "not loaded")
        verify = verify_from_secret(secrets.verify, source.verify.secret_ref.name)
    return SourceSpec(
        url=source.url, ref=source.ref, path=source.path, credentials=credentials, verify=verify
    )


def resource_limits(tenant: Tenant) -> ResourceLimits:
    res = tenant.spec.resources  # within ResourceLimits' bounds: TenantResources checks them
    return ResourceLimits(
        cpu_millis=res.cpu_millis(),
        memory_bytes=res.memory_bytes(),
        tasks=res.tasks,
        disk_bytes=res.disk_bytes(),
    )


def to_machine_spec(tenant: Tenant, secrets: TenantSecrets | None = None) -> MachineSpec:
    """The shim's desired state for this tenant. Raises TranslateError."""
    spec = tenant.spec
    return MachineSpec(
        name=tenant.metadata.name,
        runtime=spec.runtime,
        image=spec.image.name,
        source=None
        if spec.source is None
        else source_spec(spec.source, secrets or TenantSecrets()),
        resources=resource_limits(tenant),
        network=spec.network,
        extensions=spec.extensions,
        repo_settings=spec.repo_settings,
        suspend=spec.suspend,
        keep_data_on_delete=spec.keep_data_on_delete,
    )


def image_spec(tenant: Tenant) -> ImageSpec | None:
    """The import request for a tenant whose image names a URL; None for a local image."""
    image = tenant.spec.image
    if image.url is None:
        return None
    return ImageSpec(url=image.url, sha256=image.sha256, verify=image.verify)
