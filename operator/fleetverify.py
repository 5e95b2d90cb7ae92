"""Signed fleet commits in standalone mode (`bitbuilder run --fleet-verify NAME`).

The fleet decides what runs on the host, so like a tenant's repo it may be required to carry
signatures by trusted keys. git itself checks them (`git verify-commit`): SSH signatures
against an allowed-signers file made from the trusted keys, OpenPGP signatures against a
throw-away keyring that holds only the trusted keys. The head commit is checked, as Flux does
for a GitRepository. (The shim's own checker for tenant repos is not importable from the
operator side, which may use only the shim's API models.)
"""

from __future__ import annotations

import os
import subprocess
import tempfile
from pathlib import Path

from bitbuilder.hostshim.api import VerifySpec


class Unverified(Exception):
    """The commit is unsigned or not signed by a trusted key."""


def verify_commit(repo: Path, commit: str, trusted: VerifySpec) -> None:
    """Raises Unverified unless `commit` in the repository at `repo` is signed by a key of
    `trusted`."""
    with tempfile.TemporaryDirectory(prefix="bbfv") as home:  # short: gpg-agent sockets
        signers = Path(home) / "allowed_signers"
        signers.write_text("".join(f"trusted {key}\n" for key in trusted.ssh_keys))
        env = {
            **os.environ,
            "GNUPGHOME": home,
            "GIT_CONFIG_NOSYSTEM": "1",
            "GIT_CONFIG_GLOBAL": os.devnull,
        }
        try:
            for key in trusted.gpg_keys:
                _run(["gpg", "--batch", "--quiet", "--import"], env, stdin=key)
            argv = ["git", "-c", f"gpg.ssh.allowedSignersFile={signers}", "verify-commit", commit]
            done = _run(argv, env, cwd=repo, check=False)
        finally:
            subprocess.run(["gpgconf", "--kill", "all"], env=env, capture_output=True, check=False)
    if done.returncode != 0:
        lines = [line for line in done.stderr.splitlines() if line.strip()]
        why = lines[-1].strip() if lines else "the commit is not signed"
        raise Unverified(f"commit {commit} is not signed by a trusted key: {why}")


def _run(
    argv: list[str],
    env: dict[str, str],
    stdin: str = "",
    cwd: Path | None = None,
    check: bool = True,
) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(
        argv, input=stdin, env=env, cwd=cwd, capture_output=True, text=True, timeout=60
    )
    if check and done.returncode != 0:
        raise Unverified(f"{argv[0]}: {done.stderr.strip() or 'failed'}")
    return done
