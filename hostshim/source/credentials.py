"""Git credentials for one tenant: files under TenantPaths.credentials, pygit2 callbacks.

Secrets never reach a log or an error message: failures are reported as "authentication
failed" without the password or key. The SSH private key stays in memory (libssh2 takes it
from a buffer); the only file is known_hosts (folder 0700, file 0600). SSH host keys are always checked against the
spec's known_hosts: libgit2 reads `$HOME/.ssh/known_hosts`, so while an SSH operation runs the
libgit2 home directory points at the tenant's credentials folder (a process-wide setting,
hence the lock).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlsplit

import pygit2
from pygit2.enums import CredentialType

from bitbuilder.hostshim import safepath
from bitbuilder.hostshim.api import GitCredentials
from bitbuilder.hostshim.errors import SourceError
from bitbuilder.hostshim.paths import TenantPaths

_HOME_LOCK = threading.Lock()
KNOWN_HOSTS = Path(".ssh", "known_hosts")


class AuthenticationFailed(SourceError):
    reason = "AuthenticationFailed"


def is_ssh(url: str) -> bool:
    return url.startswith("ssh://") or ("://" not in url and "@" in url.split(":", 1)[0])


def ssh_user(url: str, creds: GitCredentials | None) -> str:
    if url.startswith("ssh://"):
        user = urlsplit(url).username
    else:
        user = url.split("@", 1)[0] if "@" in url.split(":", 1)[0] else None
    return user or (creds.username if creds and creds.username else "git")


class Callbacks(pygit2.RemoteCallbacks):
    """Answers libgit2's credential and certificate questions for one operation."""

    def __init__(self, creds: GitCredentials | None, user: str) -> None:
        super().__init__()
        self._creds = creds
        self._user = user
        self._tried: set[CredentialType] = set()

    def credentials(
        self, url: str, username_from_url: str | None, allowed_types: CredentialType
    ) -> pygit2.Username | pygit2.UserPass | pygit2.KeypairFromMemory:
        creds = self._creds
        kind = _pick(creds, allowed_types)
        # libgit2 asks again after a rejected answer: the same question twice means "refused".
        if creds is None or kind is None or kind in self._tried:
            raise AuthenticationFailed("authentication failed: the server refused the credentials")
        self._tried.add(kind)
        user = username_from_url or self._user
        if kind == CredentialType.USERNAME:
            return pygit2.Username(user)
        if kind == CredentialType.SSH_MEMORY and creds.ssh_private_key is not None:
            return pygit2.KeypairFromMemory(
                user, None, creds.ssh_private_key.get_secret_value(), ""
            )
        assert creds.password is not None
        return pygit2.UserPass(creds.username or "", creds.password.get_secret_value())

    def certificate_check(self, certificate: None, valid: bool, host: bytes) -> bool:
        # pygit2 would accept any SSH host key by default; accept only what libgit2 matched
        # against known_hosts (SSH) or the system CAs (TLS).
        return valid


def _pick(creds: GitCredentials | None, allowed: CredentialType) -> CredentialType | None:
    if creds is None:
        return None
    if creds.ssh_private_key is not None:
        for kind in (CredentialType.USERNAME, CredentialType.SSH_MEMORY):
            if allowed & kind:
                return kind
    if creds.password is not None and allowed & CredentialType.USERPASS_PLAINTEXT:
        return CredentialType.USERPASS_PLAINTEXT
    return None


def write_credentials(paths: TenantPaths, creds: GitCredentials | None) -> Path:
    """Write the files the credentials need (known_hosts); returns the libgit2 home to use.

    Folder 0700, files 0600, replaced atomically; nothing is written without credentials.
    """
    home = paths.credentials
    if creds is None or creds.ssh_known_hosts is None:
        safepath.remove_tree(home)
        return home
    ssh_dir = home / KNOWN_HOSTS.parent
    for d in (home, ssh_dir):
        d.mkdir(mode=0o700, exist_ok=True)
        os.chmod(d, 0o700)
    tmp = ssh_dir / f".known_hosts.{os.getpid()}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "w") as f:
        os.fchmod(fd, 0o600)
        f.write(creds.ssh_known_hosts.rstrip("\n") + "\n")
    os.rename(tmp, home / KNOWN_HOSTS)
    return home


@contextmanager
def libgit2_home(home: Path) -> Iterator[None]:
    """Point libgit2's home (where it finds .ssh/known_hosts) at `home` for this block."""
    with _HOME_LOCK:
        previous = pygit2.settings.homedir
        pygit2.settings.homedir = str(home)
        try:
            yield
        finally:
            pygit2.settings.homedir = previous or ""
