"""Raw disk images for VMs: accepted only as GPT disks (what systemd-vmspawn and
systemd-dissect boot), checked by the primary header's signature and CRC."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

from bitbuilder.hostshim.errors import ImageError

RAW_SUFFIXES = (".raw", ".img")
_SIGNATURE = b"EFI PART"


def is_raw_name(name: str) -> bool:
    return name.endswith(RAW_SUFFIXES)


def check_gpt(path: Path, shown: str) -> None:
    """Raise ImageInvalid unless `path` carries a valid GPT header (512- or 4096-byte sectors)."""
    with path.open("rb") as f:
        for sector in (512, 4096):
            f.seek(sector)
            header = f.read(sector)
            if header[:8] != _SIGNATURE:
                continue
            size = struct.unpack_from("<I", header, 12)[0]
            stored = struct.unpack_from("<I", header, 16)[0]
            if 92 <= size <= sector:
                zeroed = header[:16] + b"\0\0\0\0" + header[20:size]
                if zlib.crc32(zeroed) == stored:
                    return
            raise ImageError(
                f"raw image {shown!r} has a damaged GPT header (bad size or CRC)",
                reason="ImageInvalid",
            )
    raise ImageError(
        f"raw image {shown!r} is not a GPT disk image (no 'EFI PART' header)",
        reason="ImageInvalid",
    )
