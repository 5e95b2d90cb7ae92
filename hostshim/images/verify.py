"""Image verification: a file's sha256, and SHA256SUMS signed by a key the host trusts.

As systemd-importd's --verify=signature: SHA256SUMS and its detached signature SHA256SUMS.gpg
sit beside the image; the signature is checked first (against the host's trusted keys only),
then the image's line in SHA256SUMS gives the digest the download must match. Each failure
has its own reason, so an admin sees which of the three is wrong.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

from bitbuilder.hostshim.errors import ImageError
from bitbuilder.hostshim.openpgp import OpenPgpError, Refusal, verify_detached

SUMS = "SHA256SUMS"
SIGNATURE = "SHA256SUMS.gpg"
_CHUNK = 1 << 20
_SUMS_LINE = re.compile(r"^([0-9a-f]{64}) [ *](.+)$")
_REASONS = {
    Refusal.bad: "ImageSignatureInvalid",
    Refusal.rejected: "ImageSignatureInvalid",
    Refusal.untrusted: "ImageKeyUntrusted",
    Refusal.unusable: "ImageKeyInvalid",
}


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def check_sha256(path: Path, expected: str, shown: str) -> str:
    actual = sha256_file(path)
    if actual != expected:
        raise ImageError(
            f"image {shown!r} has sha256 {actual}, expected {expected}",
            reason="ImageDigestMismatch",
        )
    return actual


def signed_digest(
    sums: Path, signature: Path, keys: tuple[str, ...], filename: str
) -> tuple[str, str]:
    """(the sha256 SHA256SUMS lists for `filename`, the signing key's fingerprint)."""
    if not keys:
        raise ImageError(
            "verify: signature needs keys the host trusts: start the shim with --trusted-image-key",
            reason="ImageKeyUntrusted",
        )
    try:
        fingerprint = verify_detached(signature.read_bytes(), sums.read_bytes(), keys, SUMS)
    except OpenPgpError as exc:
        raise ImageError(f"{SUMS}: {exc.message}", reason=_REASONS[exc.refusal]) from exc
    for line in sums.read_text(errors="replace").splitlines():
        match = _SUMS_LINE.match(line.strip())
        if match and match.group(2) == filename:
            return match.group(1), fingerprint
    raise ImageError(f"{SUMS} does not list {filename!r}", reason="ImageNotListed")
