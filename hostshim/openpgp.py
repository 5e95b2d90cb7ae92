"""Detached OpenPGP signature checks through gpg, in a throw-away GNUPGHOME holding only the
keys the caller trusts. Used for tenant commits and for image checksum lists (SHA256SUMS.gpg).
"""

from __future__ import annotations

import subprocess
import tempfile
from enum import StrEnum
from pathlib import Path

TOOL_TIMEOUT = 30.0


class Refusal(StrEnum):
    bad = "bad"  # the signature does not match the data
    untrusted = "untrusted"  # made by a key the caller does not trust
    rejected = "rejected"  # expired or revoked key or signature
    unusable = "unusable"  # a trusted key that cannot be imported, gpg that cannot run


class OpenPgpError(Exception):
    def __init__(self, refusal: Refusal, message: str) -> None:
        super().__init__(message)
        self.refusal = refusal
        self.message = message


def _gpg(home: str, *args: str) -> list[str]:
    return ["gpg", "--homedir", home, "--batch", "--no-tty", "--no-autostart", *args]


def run_tool(argv: list[str], stdin: bytes = b"") -> subprocess.CompletedProcess[str]:
    """Run a verification tool with a deadline; its output decoded whatever bytes it wrote."""
    try:
        proc = subprocess.run(argv, input=stdin, capture_output=True, timeout=TOOL_TIMEOUT)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise OpenPgpError(Refusal.unusable, f"could not run {argv[0]}: {exc}") from exc
    return subprocess.CompletedProcess(
        argv,
        proc.returncode,
        proc.stdout.decode(errors="replace"),
        proc.stderr.decode(errors="replace"),
    )


def verify_detached(signature: bytes, payload: bytes, keys: tuple[str, ...], what: str) -> str:
    """The primary fingerprint of the trusted key that signed `payload` (`what` names it in
    messages); OpenPgpError saying why not otherwise."""
    if not keys:
        raise OpenPgpError(Refusal.untrusted, f"no OpenPGP keys are trusted to sign {what}")
    # gpg's sockets live in the home dir: keep its path short.
    with tempfile.TemporaryDirectory(prefix="bbgpg") as home:
        trusted = _import_keys(home, keys)
        sig, data = Path(home, "sig"), Path(home, "payload")
        sig.write_bytes(signature)
        data.write_bytes(payload)
        proc = run_tool(_gpg(home, "--status-fd", "1", "--verify", str(sig), str(data)))
    status = [line.split()[1:] for line in proc.stdout.splitlines() if line.startswith("[GNUPG:]")]
    words = {fields[0]: fields[1:] for fields in status if fields}
    if "BADSIG" in words:
        raise OpenPgpError(Refusal.bad, f"bad OpenPGP signature (does not match {what})")
    for bad in ("EXPKEYSIG", "REVKEYSIG", "EXPSIG"):
        if bad in words:
            raise OpenPgpError(Refusal.rejected, f"OpenPGP signature rejected ({bad})")
    valid = words.get("VALIDSIG")
    if "NODATA" in words and "ERRSIG" not in words:
        raise OpenPgpError(Refusal.bad, f"the signature of {what} is not an OpenPGP signature")
    if "GOODSIG" not in words or not valid or proc.returncode != 0:
        keyid = (words.get("ERRSIG") or words.get("NO_PUBKEY") or ["unknown"])[0]
        raise OpenPgpError(Refusal.untrusted, f"signed by untrusted OpenPGP key {keyid}")
    primary = valid[-1].upper()
    if primary not in trusted:
        raise OpenPgpError(Refusal.untrusted, f"signed by untrusted OpenPGP key {primary}")
    return primary


def _import_keys(home: str, keys: tuple[str, ...]) -> set[str]:
    """Import each trusted key; return the primary fingerprints gpg now holds."""
    for i, key in enumerate(keys, 1):
        proc = run_tool(_gpg(home, "--import"), key.encode())
        if proc.returncode != 0:
            raise OpenPgpError(Refusal.unusable, f"trusted OpenPGP key #{i} could not be imported")
    listing = run_tool(_gpg(home, "--with-colons", "--fixed-list-mode", "--list-keys"))
    fingerprints, last = set(), ""
    for line in listing.stdout.splitlines():
        fields = line.split(":")
        if fields[0] in ("pub", "sub"):
            last = fields[0]
        elif fields[0] == "fpr" and last == "pub":
            fingerprints.add(fields[9].upper())
    return fingerprints
