"""A VM's host side without booting one: its guest layer, its root overlay, its power button."""

from __future__ import annotations

import json
import os
import socket
import stat
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from bitbuilder.hostshim.machine.network import Link
from bitbuilder.hostshim.machine.vm import (
    NETWORK_FILE,
    guest_layer,
    mount_overlay,
    prepare_upper,
    request_power_off,
)
from bitbuilder.hostshim.source.layout import Layout, RepoSettings
from tests.helpers.needs import needs_root_and

LINK = Link("bb0123456789a", "host0", "10.250.0.5/30", "10.250.0.6/30")


def private_tree(root: Path, files: dict[str, str]) -> None:
    """Files as a root-private checkout has them: directories 0700, files 0600."""
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        path.write_text(text)
        path.chmod(0o600)
    for dirpath, _dirs, _files in os.walk(root):
        os.chmod(dirpath, 0o700)


def layout(root: Path) -> Layout:
    private_tree(
        root,
        {
            "confext/a/etc/app/conf": "a\n",
            "confext/b/etc/app/conf": "b\n",  # later name wins
            "sysext/tools/usr/lib/tools/version": "1\n",
            "units/app.service": "[Service]\nExecStart=/bin/true\n[Install]\n"
            "WantedBy=multi-user.target\n",
        },
    )
    (root / "confext/a/etc/app/link").symlink_to("/etc/shadow")
    return Layout(
        root=root,
        sysext={"tools": root / "sysext/tools"},
        confext={"a": root / "confext/a", "b": root / "confext/b"},
        units={"app.service": root / "units/app.service"},
        settings=RepoSettings(),
    )


def test_guest_layer_holds_the_revision_units_and_address_readable_by_all(
    tmp_path: Path,
) -> None:
    layer = guest_layer(tmp_path / "guest", layout(tmp_path / "rev"), LINK)
    assert (layer / "etc/app/conf").read_text() == "b\n"
    assert (layer / "usr/lib/tools/version").read_text() == "1\n"
    # A symlink stays a symlink, for the guest to resolve in its own root.
    assert os.readlink(layer / "etc/app/link") == "/etc/shadow"
    wants = layer / "etc/systemd/system/multi-user.target.wants/app.service"
    assert os.readlink(wants) == "../app.service"
    network = (layer / NETWORK_FILE).read_text()
    assert "Address=10.250.0.6/30" in network and "Type=ether" in network
    # A 0700 /etc or /usr in the guest stops its non-root services (networkd: 200/CHDIR).
    for dirpath, _dirs, files in os.walk(layer):
        assert stat.S_IMODE(os.stat(dirpath).st_mode) == 0o755, dirpath
        for name in files:
            mode = os.lstat(os.path.join(dirpath, name)).st_mode
            if stat.S_ISREG(mode):
                assert stat.S_IMODE(mode) == 0o644, name


def test_guest_layer_without_network_or_revision(tmp_path: Path) -> None:
    layer = guest_layer(tmp_path / "guest", None, None)
    assert list(layer.iterdir()) == []


@needs_root_and("mount")
def test_root_overlay_takes_long_lower_paths_and_the_images_root_mode(tmp_path: Path) -> None:
    # util-linux >= 2.39 `mount -o` cuts each option value at 256 bytes: mount(2) does not.
    deep = tmp_path / ("d" * 120) / ("e" * 120) / "image"
    deep.mkdir(parents=True)
    (deep / "from-image").write_text("image\n")
    deep.chmod(0o755)
    guest = guest_layer(tmp_path / "guest", None, LINK)
    upper, work, root = tmp_path / "upper", tmp_path / "work", tmp_path / "root"
    work.mkdir()
    root.mkdir()
    os.umask(old := os.umask(0o077))
    try:
        prepare_upper(upper, deep)
    finally:
        os.umask(old)
    mount_overlay(root, [guest, deep], upper, work)
    try:
        assert (root / "from-image").read_text() == "image\n"
        assert "10.250.0.6/30" in (root / NETWORK_FILE).read_text()
        assert stat.S_IMODE(os.stat(root).st_mode) == 0o755
    finally:
        subprocess.run(["umount", str(root)], check=True)


@pytest.fixture
def fake_qmp(tmp_path: Path) -> Iterator[tuple[Path, list[str]]]:
    """A unix socket speaking enough QMP: greeting, then a reply to each command."""
    path = tmp_path / "qmp.sock"
    seen: list[str] = []
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(path))
    server.listen(1)

    def serve() -> None:
        conn, _ = server.accept()
        with conn, conn.makefile("rwb") as stream:
            stream.write(b'{"QMP": {"version": {}}}\n')
            stream.flush()
            for line in stream:
                seen.append(json.loads(line)["execute"])
                stream.write(b'{"event": "POWERDOWN"}\n{"return": {}}\n')
                stream.flush()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield path, seen
    server.close()
    thread.join(5)


def test_power_off_presses_the_acpi_button_over_qmp(fake_qmp: tuple[Path, list[str]]) -> None:
    path, seen = fake_qmp
    assert request_power_off(path)
    assert seen == ["qmp_capabilities", "system_powerdown"]


def test_power_off_without_qemu_is_false(tmp_path: Path) -> None:
    assert not request_power_off(tmp_path / "none.sock")
