"""Commit signature verification against the keys a MachineSpec trusts.

SSH signatures go through `ssh-keygen -Y verify` with an allowed_signers file built from the
trusted keys (namespace "git", as git itself signs); OpenPGP through gpg in a throw-away
GNUPGHOME holding only the trusted keys. A commit is accepted only if one of those keys made a
valid signature over exactly the commit's signed payload.
"""

from __future__ import annotations

import base64
import binascii
import functools
import re
import subprocess
import tempfile
from pathlib import Path

from bitbuilder.hostshim.api import VerifySpec
from bitbuilder.hostshim.errors import SourceError
from bitbuilder.hostshim.openpgp import OpenPgpError, run_tool, verify_detached

SSH_SIG = b"-----BEGIN SSH SIGNATURE-----"
PGP_SIG = b"-----BEGIN PGP SIGNATURE-----"
PRINCIPAL = "trusted"
TOOL_TIMEOUT = 30.0

_KEY_TYPE = re.compile(r"^(ssh-(ed25519|rsa|dss)|ecdsa-sha2-nistp(256|384|521)|sk-[a-z0-9@.-]+)$")
_FINGERPRINT = re.compile(r"(SHA256:[A-Za-z0-9+/=]+)")


class Unverified(SourceError):
    reason = "UnverifiedCommit"


def verify_commit(commit: str, signed: tuple[bytes, bytes] | None, spec: VerifySpec) -> str:
    """Check a commit's `(signature, payload)` (pygit2's extract_signature) against `spec`.

    Returns a short description of the accepted key; raises Unverified naming the commit and why.
    """
    if signed is None:
        raise Unverified(f"commit {commit} is not signed", revision=commit)
    signature, payload = signed
    keys = (tuple(spec.ssh_keys), tuple(spec.gpg_keys))
    try:
        if signature.lstrip().startswith(SSH_SIG):
            return _verify_ssh(signature, payload, keys[0])
        if signature.lstrip().startswith(PGP_SIG):
            return _verify_gpg(signature, payload, keys[1])
    except Unverified as exc:
        raise Unverified(f"commit {commit}: {exc.message}", revision=commit) from None
    raise Unverified(f"commit {commit} has an unsupported signature type", revision=commit)


def _run(argv: list[str], stdin: bytes = b"") -> subprocess.CompletedProcess[str]:
    try:
        return run_tool(argv, stdin)
    except OpenPgpError as exc:
        raise Unverified(exc.message) from exc


# --- SSH -------------------------------------------------------------------------------------


def allowed_signers(keys: tuple[str, ...]) -> str:
    """An allowed_signers file trusting `keys` for git signatures only; options never pass."""
    lines = []
    for i, key in enumerate(keys, 1):
        parts = key.split()
        if len(parts) < 2 or not _KEY_TYPE.match(parts[0]) or not _is_base64(parts[1]):
            raise Unverified(f"trusted SSH key #{i} is not an SSH public key ('TYPE BASE64 ...')")
        lines.append(f'{PRINCIPAL} namespaces="git" {parts[0]} {parts[1]}\n')
    return "".join(lines)


def _is_base64(text: str) -> bool:
    try:
        base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        return False
    return True


@functools.lru_cache(maxsize=256)
def _verify_ssh(signature: bytes, payload: bytes, keys: tuple[str, ...]) -> str:
    if not keys:
        raise Unverified("is SSH-signed but no SSH keys are trusted")
    signers = allowed_signers(keys)
    with tempfile.TemporaryDirectory(prefix="bb-sshsig-") as tmp:
        sig, allowed = Path(tmp, "sig"), Path(tmp, "allowed_signers")
        sig.write_bytes(signature)
        allowed.write_text(signers)
        check = _run(["ssh-keygen", "-Y", "check-novalidate", "-n", "git", "-s", str(sig)], payload)
        if check.returncode != 0:
            raise Unverified("bad SSH signature (does not match the commit)")
        found = _FINGERPRINT.search(check.stdout + check.stderr)
        key = found.group(1) if found else "unknown key"
        argv = ["ssh-keygen", "-Y", "verify", "-f", str(allowed), "-I", PRINCIPAL, "-n", "git"]
        verify = _run([*argv, "-s", str(sig)], payload)
        if verify.returncode != 0:
            raise Unverified(f"signed by untrusted SSH key {key}")
    return f"ssh key {key}"


# --- OpenPGP ---------------------------------------------------------------------------------


@functools.lru_cache(maxsize=256)
def _verify_gpg(signature: bytes, payload: bytes, keys: tuple[str, ...]) -> str:
    if not keys:
        raise Unverified("is OpenPGP-signed but no OpenPGP keys are trusted")
    try:
        return f"openpgp key {verify_detached(signature, payload, keys, 'the commit')}"
    except OpenPgpError as exc:
        raise Unverified(exc.message) from None
