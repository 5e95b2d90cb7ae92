"""The host image recipe, built for real (cached by its inputs) and checked with systemd-dissect.

Nothing is mounted on this machine: systemd-dissect reads the partition table and os-release
(in a private mount namespace of its own), the files of /usr are read from the split erofs
partition with the builder root's dump.erofs, and the checksums are verified with gpg there.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.helpers.needs import needs_root_and
from tests.image.build import IMAGE, builder_root, ensure_image

pytestmark = [
    pytest.mark.slow,
    pytest.mark.nspawn,
    pytest.mark.timeout(1800),
    needs_root_and("debootstrap", "systemd-nspawn", "systemd-dissect"),
]


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Path:
    log = tmp_path_factory.mktemp("image") / "build.log"
    try:
        return ensure_image(log)
    except subprocess.CalledProcessError as exc:
        tail = log.read_text(errors="replace")[-3000:] if log.exists() else ""
        raise AssertionError(f"the image build failed ({exc}):\n{tail}") from exc


def dissect(image: Path) -> dict[str, Any]:
    out = subprocess.run(
        ["systemd-dissect", "--no-pager", "--json=short", str(image)],
        capture_output=True, text=True, check=True, timeout=300,
    ).stdout  # fmt: skip
    result: dict[str, Any] = json.loads(out)
    return result


def in_builder(built: Path, *argv: str) -> str:
    root = builder_root(built / "build.log")
    return subprocess.run(
        ["systemd-nspawn", "--register=no", "--keep-unit", "-q", "-D", str(root),
         f"--bind-ro={built}:/work", *argv],
        env={"SYSTEMD_NSPAWN_UNIFIED_HIERARCHY": "1", "PATH": "/usr/sbin:/usr/bin:/sbin:/bin"},
        capture_output=True, text=True, check=True, timeout=300,
    ).stdout  # fmt: skip


def split(built: Path, designator: str) -> Path:
    [found] = (built / "out").glob(f"bitbuilder-host_0.1.0.{designator}.*.raw")
    return found


def test_the_ddi_has_a_verity_protected_erofs_usr_and_no_root(built: Path) -> None:
    info = dissect(built / "out" / IMAGE)
    assert "IMAGE_ID=bitbuilder-host" in info["osRelease"]
    assert "ID=debian" in info["osRelease"]
    assert info["useBootableUefi"] is True
    parts = {m["designator"]: m for m in info["mounts"]}
    assert set(parts) == {"esp", "usr", "usr-verity", "usr-verity-sig"}  # root: made at boot
    assert parts["usr"]["fstype"] == "erofs" and parts["usr"]["rw"] == "ro"
    assert parts["esp"]["fstype"] == "vfat"
    # The signature partition signs the usr root hash; systemd finds the data and hash
    # partitions by it (their UUIDs are its first and last 128 bits).
    signed = json.loads(split(built, "usr-x86-64-verity-sig").read_bytes().rstrip(b"\0"))
    uuids = [parts[d]["partition_uuid"].replace("-", "") for d in ("usr", "usr-verity")]
    assert signed["rootHash"] == "".join(uuids)
    assert signed["signature"]


def test_usr_holds_the_shim_its_units_generator_and_presets(built: Path) -> None:
    usr = "/work/out/" + split(built, "usr-x86-64").name
    listing = in_builder(built, "dump.erofs", "--ls", "--path=/lib/systemd/system", usr)
    for unit in ("bitbuilder-hostshim.service", "bitbuilder-hostshim.socket",
                 "setup-tenant@.service", "bitbuilder-host-layers.service"):  # fmt: skip
        assert unit in listing, unit
    generators = in_builder(
        built, "dump.erofs", "--ls", "--path=/lib/systemd/system-generators", usr
    )
    assert "bitbuilder-hostshim-generator" in generators
    assert "systemd-import-generator" in generators
    commands = in_builder(built, "dump.erofs", "--ls", "--path=/local/bin", usr)
    assert "bitbuilder-hostshim" in commands and "bitbuilder-hostshim-host-restore" in commands
    presets = in_builder(built, "dump.erofs", "--ls", "--path=/lib/systemd/system-preset", usr)
    assert "10-bitbuilder.preset" in presets


def test_sha256sums_list_the_image_and_carry_a_valid_signature(built: Path) -> None:
    sums = (built / "out" / "bitbuilder-host_0.1.0.SHA256SUMS").read_text()
    digests = {}
    for line in sums.splitlines():
        digest, name = line.split(maxsplit=1)
        digests[name.lstrip("*")] = digest
    image = (built / "out" / IMAGE).resolve()
    sha = hashlib.sha256()
    with open(image, "rb") as f:
        while chunk := f.read(1 << 20):
            sha.update(chunk)
    assert digests[image.name] == sha.hexdigest()
    verified = in_builder(
        built, "sh", "-c",
        "export GNUPGHOME=$(mktemp -d) && gpg --batch --import /work/signing-key.asc 2>/dev/null"
        " && gpg --batch --status-fd 1 --verify /work/out/bitbuilder-host_0.1.0.SHA256SUMS.gpg"
        " /work/out/bitbuilder-host_0.1.0.SHA256SUMS",
    )  # fmt: skip
    assert "[GNUPG:] VALIDSIG" in verified
