"""The nspawn command line: built from checked values only; hostile values refused."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from bitbuilder.hostshim.errors import MachineError
from bitbuilder.hostshim.machine.layers import build_units_layer, tree_layers
from bitbuilder.hostshim.machine.runtime.nspawn import (
    InitKind,
    NspawnMachine,
    detect_init,
    nspawn_argv,
)


def machine(**overrides: Any) -> NspawnMachine:
    values: dict[str, Any] = {
        "name": "web",
        "root": Path("/run/bb/machines/web/root"),
        "veth": ("bb0123456789a", "host0"),
        "init": InitKind.other,
    }
    values.update(overrides)
    return NspawnMachine(**values)


def test_argv_for_an_isolated_busybox_machine() -> None:
    argv = nspawn_argv(
        machine(
            etc_layers=(Path("/s/rev/confext/a/etc"), Path("/s/rev/confext/b/etc")),
            usr_layers=(Path("/s/rev/sysext/t/usr"),),
            hostname="web-1",
            environment={"B": "2", "A": "1 2"},
        )
    )
    assert argv[0] == "systemd-nspawn"
    for flag in ("--register=no", "--keep-unit", "--boot", "--private-users=pick",
                 "--directory=/run/bb/machines/web/root", "--machine=web",
                 "--network-veth-extra=bb0123456789a:host0", "--kill-signal=SIGUSR2",
                 "--hostname=web-1"):  # fmt: skip
        assert flag in argv
    assert "--private-network" not in argv
    assert [a for a in argv if a.startswith("--setenv")] == ["--setenv=A=1 2", "--setenv=B=2"]
    assert "--overlay-ro=+/etc:/s/rev/confext/a/etc:/s/rev/confext/b/etc:/etc" in argv
    assert "--overlay-ro=+/usr:/s/rev/sysext/t/usr:/usr" in argv


def test_layers_from_idmapped_sources_are_read_inside() -> None:
    argv = nspawn_argv(
        machine(
            etc_layers=(Path("/run/bb/units/etc"), Path("/s/rev/confext/a/etc"), Path("/cap")),
            idmapped=((Path("/s/rev"), "/.bitbuilder/revision"),
                      (Path("/run/bb/units"), "/.bitbuilder/units")),
        )
    )  # fmt: skip
    binds = [a for a in argv if a.startswith("--bind")]
    assert binds == [
        "--bind-ro=/s/rev:/.bitbuilder/revision:norbind,idmap",
        "--bind-ro=/run/bb/units:/.bitbuilder/units:norbind,idmap",
    ]
    overlay = "+/.bitbuilder/units/etc:+/.bitbuilder/revision/confext/a/etc:/cap"
    assert f"--overlay-ro=+/etc:{overlay}:/etc" in argv
    assert argv.index(binds[-1]) < argv.index(f"--overlay-ro=+/etc:{overlay}:/etc")


def test_argv_for_systemd_without_network() -> None:
    argv = nspawn_argv(machine(init=InitKind.systemd, veth=None))
    assert "--kill-signal=SIGRTMIN+3" in argv and "--private-network" in argv
    assert not [a for a in argv if a.startswith(("--overlay", "--hostname", "--setenv"))]


@pytest.mark.parametrize(
    "overrides",
    [
        {"name": "../etc"},
        {"name": "Web"},
        {"hostname": "-x"},
        {"hostname": "a..b"},
        {"hostname": "a" * 64},
        {"environment": {"SYSTEMD_LOG_LEVEL": "debug"}},
        {"environment": {"A=B": "1"}},
        {"environment": {"A": "line\nbreak"}},
        {"environment": {"--boot": "1"}},
        {"root": Path("relative/root")},
        {"etc_layers": (Path("/rev/con:fext/etc"),)},
        {"usr_layers": (Path("/rev/a,b/usr"),)},
        {"usr_layers": (Path("/rev/../../usr"),)},
        {"veth": ("bb-0123", "host0")},
        {"veth": ("bb0123456789abcdef", "host0")},
    ],
)
def test_hostile_values_never_reach_argv(overrides: dict[str, Any]) -> None:
    with pytest.raises((MachineError, ValueError)):
        nspawn_argv(machine(**overrides))


def test_detect_init_does_not_follow_the_images_symlinks(tmp_path: Path) -> None:
    busybox = tmp_path / "busybox"
    (busybox / "sbin").mkdir(parents=True)
    (busybox / "sbin/init").symlink_to("../bin/busybox")
    assert detect_init(busybox) is InitKind.other

    debian = tmp_path / "debian"
    (debian / "usr/lib/systemd").mkdir(parents=True)
    (debian / "usr/lib/systemd/systemd").write_text("")
    assert detect_init(debian) is InitKind.systemd

    linked = tmp_path / "linked"
    (linked / "sbin").mkdir(parents=True)
    (linked / "sbin/init").symlink_to("/lib/systemd/systemd")
    assert detect_init(linked) is InitKind.systemd

    hostile = tmp_path / "hostile"
    hostile.mkdir()
    (hostile / "usr").symlink_to("/usr")  # would find the host's systemd if followed
    assert detect_init(hostile) is InitKind.other


def test_units_layer_copies_units_and_enables_wanted_ones(tmp_path: Path) -> None:
    repo = tmp_path / "units"
    repo.mkdir()
    (repo / "web.service").write_text(
        "[Service]\nExecStart=/bin/true\n[Install]\nWantedBy=multi-user.target ../evil.target\n"
    )
    (repo / "helper.service").write_text("[Service]\nExecStart=/bin/true\n")
    units = {"web.service": repo / "web.service", "helper.service": repo / "helper.service"}
    etc = build_units_layer(tmp_path / "layer", units)
    system = etc / "systemd/system"
    assert (system / "web.service").read_text().startswith("[Service]")
    assert os.readlink(system / "multi-user.target.wants/web.service") == "../web.service"
    assert sorted(p.name for p in system.iterdir()) == [
        "helper.service",
        "multi-user.target.wants",
        "web.service",
    ]
    (repo / "link.service").symlink_to("/etc/passwd")
    with pytest.raises(MachineError):
        build_units_layer(tmp_path / "layer2", {"link.service": repo / "link.service"})


def test_extension_layers_never_pass_through_symlinks(tmp_path: Path) -> None:
    root = tmp_path / "rev"
    (root / "confext/good/etc").mkdir(parents=True)
    (root / "sysext/opt-only/opt").mkdir(parents=True)
    (root / "confext/evil").mkdir(parents=True)
    (root / "confext/evil/etc").symlink_to("/etc")
    (root / "confext/linked").symlink_to("/")
    good = {"good": root / "confext/good"}
    assert tree_layers(root, good, "etc") == [root / "confext/good/etc"]
    assert tree_layers(root, {"opt-only": root / "sysext/opt-only"}, "usr") == []
    for name in ("evil", "linked"):
        with pytest.raises(MachineError, match=name):
            tree_layers(root, {name: root / "confext" / name}, "etc")
