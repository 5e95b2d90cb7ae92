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
from tests.image.build import (
    BUILDER_ENV,
    BUILDER_MOUNT,
    IMAGE,
    SYSEXT,
    builder_root,
    in_builder_argv,
)

pytestmark = [
    pytest.mark.slow,
    pytest.mark.nspawn,
    pytest.mark.timeout(1800),
    needs_root_and("debootstrap", "systemd-nspawn", "systemd-dissect"),
]


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
        in_builder_argv(root, f"--bind-ro={built}:{BUILDER_MOUNT}", *argv),
        env=BUILDER_ENV,
        capture_output=True,
        text=True,
        check=True,
        timeout=300,
    ).stdout


def erofs_ls(built: Path, partition: str, path: str) -> str:
    """The names in `path` of an erofs partition file in `built`'s out/."""
    return in_builder(
        built, "dump.erofs", "--ls", f"--path={path}", f"{BUILDER_MOUNT}/out/{partition}"
    )


def split(built: Path, designator: str, image: str = IMAGE) -> Path:
    """A partition of `image` in a file of its own (mkosi adds the partition's UUID to the
    name, systemd-repart --make-ddi does not)."""
    stem = image.removesuffix(".raw")
    [found] = [
        *(built / "out").glob(f"{stem}.{designator}.raw"),
        *(built / "out").glob(f"{stem}.{designator}.*.raw"),
    ]
    return found


def env_file(lines: list[str]) -> dict[str, str]:
    pairs = (line.split("=", 1) for line in lines if "=" in line)
    return {key: value.strip('"') for key, value in pairs}


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
    usr = split(built, "usr-x86-64").name
    listing = erofs_ls(built, usr, "/lib/systemd/system")
    for unit in ("bitbuilder-hostshim.service", "bitbuilder-hostshim.socket",
                 "setup-tenant@.service", "bitbuilder-host-layers.service"):  # fmt: skip
        assert unit in listing, unit
    generators = erofs_ls(built, usr, "/lib/systemd/system-generators")
    assert "bitbuilder-hostshim-generator" in generators
    assert "systemd-import-generator" in generators
    commands = erofs_ls(built, usr, "/local/bin")
    assert "bitbuilder-hostshim" in commands and "bitbuilder-hostshim-host-restore" in commands
    # The build's certificate: systemd trusts extension images signed with its key.
    assert "bitbuilder.crt" in erofs_ls(built, usr, "/lib/verity.d")
    presets = erofs_ls(built, usr, "/lib/systemd/system-preset")
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
        f"cd {BUILDER_MOUNT} && export GNUPGHOME=$(mktemp -d)"
        " && gpg --batch --import signing-key.asc 2>/dev/null"
        " && gpg --batch --status-fd 1 --verify out/bitbuilder-host_0.1.0.SHA256SUMS.gpg"
        " out/bitbuilder-host_0.1.0.SHA256SUMS",
    )  # fmt: skip
    assert "[GNUPG:] VALIDSIG" in verified


def test_bitbuilder_alone_is_a_sysext_the_host_image_accepts(built: Path) -> None:
    info = dissect(built / "out" / SYSEXT)
    parts = {m["designator"]: m for m in info["mounts"]}
    assert set(parts) == {"root", "root-verity", "root-verity-sig"}
    assert parts["root"]["fstype"] == "erofs"
    # systemd-dissect found usr/lib/extension-release.d/extension-release.bitbuilder, named
    # like the image: a system extension.
    assert info["useSystemExtension"] is True
    release = env_file(info["extensionRelease"])
    # systemd-sysext merges it over the image's /usr only if these match the image's os-release.
    host = env_file(dissect(built / "out" / IMAGE)["osRelease"])
    assert (release["ID"], release["VERSION_ID"]) == (host["ID"], host["VERSION_ID"])
    assert release["SYSEXT_ID"] == "bitbuilder"
    root = split(built, "root-x86-64", SYSEXT).name
    [python] = [n for n in erofs_ls(built, root, "/usr/local/lib").split() if "python3" in n]
    package = erofs_ls(built, root, f"/usr/local/lib/{python}/dist-packages/bitbuilder/hostshim")
    assert "main.py" in package and "api.py" in package
    assert "bitbuilder-hostshim" in erofs_ls(built, root, "/usr/local/bin")
    assert "bitbuilder-hostshim.service" in erofs_ls(built, root, "/usr/lib/systemd/system")
    # Signed with the image: listed in the signed SHA256SUMS.
    sums = (built / "out" / "bitbuilder-host_0.1.0.SHA256SUMS").read_text()
    assert f" *{SYSEXT}" in sums
