"""The tenant-repo layout: what load_layout accepts, and hostile trees it refuses."""

from __future__ import annotations

import os
import socket
import stat
from pathlib import Path
from typing import Any

import pydantic
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bitbuilder.hostshim.api import MachineSpec
from bitbuilder.hostshim.errors import LayoutError
from bitbuilder.hostshim.source import layout as layout_module
from bitbuilder.hostshim.source.layout import load_layout
from tests.helpers.gitserve import Content, Link, TenantRepo
from tests.helpers.gitserve import write_files as build
from tests.source.conftest import BASIC_LAYOUT, make_spec

SECRET = "TOPSECRET-host-only\n"


def spec(**kw: Any) -> MachineSpec:
    kw.setdefault("repo_settings", ("hostname", "environment"))
    return make_spec("https://git.example/t.git", **kw)


def error_for(tree: Path, machine: MachineSpec | None = None, **kw: Any) -> str:
    with pytest.raises(LayoutError) as caught:
        load_layout(tree, machine or spec(), **kw)
    return caught.value.message


@pytest.fixture
def secret(tmp_path: Path) -> Path:
    """A host file outside every tenant tree; nothing may ever read it."""
    path = tmp_path / "host-secret"
    path.write_text(SECRET)
    return path


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    return build(tmp_path / "tree", dict(BASIC_LAYOUT))


def test_basic_layout(tree: Path) -> None:
    build(tree, {"machine.yaml": "hostname: web-1\nenvironment: {A: x, PORT: 8080}\n"})
    build(tree, {"README.md": "ignored\n", "confext/base/etc/ssh/sshd_config": "x\n"})
    found = load_layout(tree, spec())
    assert found.root == tree
    assert found.confext == {"base": tree / "confext/base"}
    assert found.sysext == {"tools": tree / "sysext/tools"}
    assert found.units == {"hello.service": tree / "units/hello.service"}
    assert (found.settings.hostname, found.settings.environment) == (
        "web-1",
        {"A": "x", "PORT": "8080"},
    )


def test_source_path_selects_a_subfolder(tmp_path: Path) -> None:
    root = build(tmp_path / "t", {f"hosts/web/{k}": v for k, v in BASIC_LAYOUT.items()})
    found = load_layout(root, spec(path="hosts/web"))
    assert found.root == root / "hosts/web" and set(found.units) == {"hello.service"}
    assert "hosts/db" in error_for(root, spec(path="hosts/db"))
    for hostile in ({"path": "../etc"}, {"path": "a/../../b"}, {"path": "/etc"}):
        with pytest.raises(pydantic.ValidationError):
            spec(**hostile)
    for name in ("..", "../x", "a/b", ".hidden"):
        with pytest.raises(pydantic.ValidationError):
            spec(extensions=[{"name": name, "type": "confext"}])


@pytest.mark.parametrize(
    ("yaml_text", "allowed", "named"),
    [
        ("environment: {A: b}\n", ("hostname",), "'environment'"),
        ("privileged: true\n", ("hostname", "environment"), "'privileged'"),
        ("hostname: Not_A_Label\n", ("hostname",), "hostname"),
        ("environment: {'1BAD': x}\n", ("environment",), "'1BAD'"),
        ("environment: {A: [1]}\n", ("environment",), "environment A"),
        ("- a list\n", ("hostname",), "mapping"),
        ("hostname: [unclosed\n", ("hostname",), "YAML"),
    ],
)
def test_machine_yaml_is_limited_to_the_allowed_settings(
    tree: Path, yaml_text: str, allowed: tuple[str, ...], named: str
) -> None:
    build(tree, {"machine.yaml": yaml_text})
    message = error_for(tree, spec(repo_settings=allowed))
    assert message.startswith("machine.yaml") and named in message


@pytest.mark.parametrize(
    ("files", "named"),
    [
        ({"confext/bad/usr/lib/x": "x"}, "confext/bad/usr"),
        ({"confext/bad/etcx": "x"}, "confext/bad/etcx"),
        ({"sysext/bad/etc/x": "x"}, "sysext/bad/etc"),
        ({"sysext/-bad/usr/x": "x"}, "sysext/-bad"),
        ({"confext/empty/.keep": ""}, "confext/empty/.keep"),
        ({"confext/file": "x"}, "confext/file"),
        ({"units/evil": "x"}, "units/evil"),
        ({"units/a.service.d/override.conf": "x"}, "units/a.service.d"),
        ({"units/big.service": "x" * (layout_module.MAX_UNIT_BYTES + 1)}, "units/big.service"),
        ({"confext/x/etc/bad\nname": "x"}, "confext/x/etc/bad"),
        ({"units/x\x1b.service": "x"}, "units/x"),
    ],
)
def test_bad_trees_are_refused_naming_the_path(
    tree: Path, files: dict[str, Content], named: str
) -> None:
    build(tree, files)
    assert error_for(tree).startswith(named)


CONF_RELEASE = "confext/base/etc/extension-release.d/extension-release.base"
SYS_RELEASE = "sysext/tools/usr/lib/extension-release.d/extension-release.tools"
DEBIAN = {"ID": "debian", "VERSION_ID": "12", "SYSEXT_LEVEL": "2"}


def test_extension_release_id(tree: Path) -> None:
    build(tree, {CONF_RELEASE: "ID=debian\nVERSION_ID=12\n"})
    assert load_layout(tree, spec(), os_release=DEBIAN).confext
    fedora = {"ID": "fedora", "VERSION_ID": "12"}
    assert "ID=debian does not match the OS (ID=fedora)" in error_for(tree, os_release=fedora)
    assert load_layout(tree, spec(), os_release={**fedora, "ID_LIKE": "rhel debian"}).confext
    (tree / CONF_RELEASE).write_text('ID="_any"\n')
    assert load_layout(tree, spec(), os_release=fedora).confext
    (tree / CONF_RELEASE).write_text("VERSION_ID=1\n")
    assert error_for(tree).startswith(CONF_RELEASE)


@pytest.mark.parametrize(
    ("release", "text", "rule"),
    [
        (CONF_RELEASE, "ID=fedora\nVERSION_ID=12\n", "ID=fedora does not match the OS"),
        (SYS_RELEASE, "ID=debian\nARCHITECTURE=s390x\n", "ARCHITECTURE=s390x is not this"),
        (SYS_RELEASE, "ID=debian\nSYSEXT_LEVEL=3\n", "SYSEXT_LEVEL=3 does not match the OS (2)"),
        (CONF_RELEASE, "ID=debian\nVERSION_ID=11\n", "VERSION_ID=11 does not match the OS (12)"),
        (SYS_RELEASE, "ID=debian\nSYSEXT_SCOPE=portable\n", "SYSEXT_SCOPE=portable does not"),
        (SYS_RELEASE, "ID=\n", "has no ID="),
    ],
)
def test_incompatible_extension_is_refused_naming_file_and_rule(
    tree: Path, release: str, text: str, rule: str
) -> None:
    """The image's os-release decides, by systemd-sysext/-confext's rules (extrelease)."""
    build(tree, {release: text})
    message = error_for(tree, os_release=DEBIAN)
    assert message.startswith(f"{release}: refused as systemd-{release.split('/')[0]}"), message
    assert rule in message


def test_compatible_extensions_by_level_or_any(tree: Path) -> None:
    build(tree, {SYS_RELEASE: "ID=debian\nSYSEXT_LEVEL=2\n", CONF_RELEASE: "ID=_any\n"})
    found = load_layout(tree, spec(), os_release=DEBIAN)
    assert set(found.sysext) == {"tools"} and set(found.confext) == {"base"}


def test_selected_extensions_only_and_missing_one_is_an_error(tree: Path) -> None:
    build(tree, {"confext/other/etc/x": "x"})
    chosen = spec(extensions=[{"name": "base", "type": "confext"}])
    found = load_layout(tree, chosen)
    assert set(found.confext) == {"base"} and found.sysext == {}
    missing = spec(extensions=[{"name": "nope", "type": "sysext"}])
    assert error_for(tree, missing).startswith("sysext/nope")


def test_symlinks_inside_trees_are_kept_never_followed(tree: Path, secret: Path) -> None:
    build(tree, {"confext/base/etc/passwd": Link("/etc/shadow")})
    build(tree, {"confext/base/etc/secret": Link(str(secret)), "sysext/tools/usr/lib": Link("..")})
    found = load_layout(tree, spec())
    assert os.readlink(found.confext["base"] / "etc/passwd") == "/etc/shadow"


@pytest.mark.parametrize(
    ("files", "named"),
    [
        ({"units/evil.service": Link("/etc/shadow")}, "units/evil.service"),
        ({"units/leak.service": Link("{secret}")}, "units/leak.service"),
        ({"machine.yaml": Link("{secret}")}, "machine.yaml"),
        ({"confext/x": Link("/etc")}, "confext/x"),
        ({"confext/x/etc": Link("/etc")}, "confext/x/etc"),
        (
            {"confext/x/etc/extension-release.d/extension-release.x": Link("{secret}")},
            "confext/x/etc/extension-release.d",
        ),
    ],
)
def test_symlinks_to_the_host_are_refused_where_they_would_be_read(
    tree: Path, secret: Path, files: dict[str, Link], named: str
) -> None:
    build(tree, {k: Link(v.target.format(secret=secret)) for k, v in files.items()})
    message = error_for(tree)
    assert message.startswith(named) and "symlink" in message
    assert SECRET.strip() not in message


def test_symlinked_folders_are_refused(tmp_path: Path, secret: Path) -> None:
    real = build(tmp_path / "real", dict(BASIC_LAYOUT))
    for folder in ("confext", "units", "sysext"):
        tree = build(tmp_path / folder, {"keep": "x", folder: Link(str(real / folder))})
        assert error_for(tree).startswith(folder)
    tree = build(tmp_path / "p", {"sub": Link(str(real))})
    assert "sub" in error_for(tree, spec(path="sub"))


@pytest.mark.parametrize("manifest", ["[" * 30000, "hostname: " + "{a: " * 20000, "- " * 20000])
def test_deeply_nested_manifest_is_refused_naming_it(tree: Path, manifest: str) -> None:
    build(tree, {"machine.yaml": manifest})
    assert error_for(tree).startswith("machine.yaml: ")


@pytest.mark.timeout(30)
def test_fifo_behind_a_symlink_is_never_opened(tree: Path, tmp_path: Path) -> None:
    """Opening a FIFO blocks: a followed link would hang here instead of failing."""
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    build(tree, {"machine.yaml": Link(str(fifo))})
    assert "symlink" in error_for(tree)


@pytest.mark.parametrize("kind", ["fifo", "chardev", "socket"])
def test_special_files_are_refused(tree: Path, kind: str) -> None:
    path = tree / "confext/base/etc/special"
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "chardev":
        os.mknod(path, 0o600 | stat.S_IFCHR, os.makedev(1, 3))
    else:
        with socket.socket(socket.AF_UNIX) as sock:
            sock.bind(str(path))
    message = error_for(tree)
    assert message.startswith("confext/base/etc/special") and "not allowed" in message


def test_entry_and_size_limits(tree: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(layout_module, "MAX_ENTRIES", 5)
    assert "more than 5" in error_for(tree)
    monkeypatch.setattr(layout_module, "MAX_ENTRIES", 1000)
    monkeypatch.setattr(layout_module, "MAX_TREE_BYTES", 2**20)
    build(tree, {"blob.bin": b"\0" * (2**20 + 1)})
    assert "exceeds" in error_for(tree)


NAMES = st.text(
    alphabet=st.characters(codec="utf-8", exclude_characters="/\x00"), min_size=1, max_size=40
).filter(lambda n: n not in (".", ".."))


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(unit=NAMES, ext=NAMES)
def test_any_names_are_accepted_or_refused_cleanly(tmp_path: Path, unit: str, ext: str) -> None:
    root = tmp_path / f"h{abs(hash((unit, ext)))}"
    try:
        build(root, {f"units/{unit}": "[Unit]\n", f"confext/{ext}/etc/x": "x"})
    except OSError:  # a name the filesystem itself refuses (e.g. too long in bytes)
        return
    try:
        found = load_layout(root, spec())
    except LayoutError as exc:
        assert exc.message.startswith(("units/", "confext/")), exc.message
        return
    assert set(found.units) == {unit} and unit.endswith(layout_module.UNIT_SUFFIXES)
    assert set(found.confext) == {ext} and "\n" not in unit + ext


def test_hostile_symlinks_through_git_stay_links(tmp_path: Path) -> None:
    """Via a real sync: the checkout stores links as links; the layout refuses linked units."""
    from bitbuilder.hostshim.config import ShimConfig
    from bitbuilder.hostshim.paths import TenantPaths
    from bitbuilder.hostshim.source.git import GitSource

    served = tmp_path / "served"
    repo = TenantRepo(served)
    commit = repo.commit({**BASIC_LAYOUT, "confext/base/etc/passwd": Link("/etc/shadow")})
    config = ShimConfig(state_dir=tmp_path / "state", file_source_roots=(served,))
    source = GitSource(TenantPaths(config, "t1"), config)
    checkout = source.sync(make_spec(repo.file_url()))
    link = checkout.tree / "confext/base/etc/passwd"
    assert link.is_symlink() and os.readlink(link) == "/etc/shadow"
    repo.commit({"units/evil.service": Link("/etc/shadow")})
    with pytest.raises(LayoutError, match=r"units/evil\.service") as caught:
        source.sync(make_spec(repo.file_url()))
    assert caught.value.revision == f"main@sha1:{repo.head()}"
    assert os.readlink(TenantPaths(config, "t1").revision(repo.head()) / "units/evil.service")
    assert checkout.commit == commit
