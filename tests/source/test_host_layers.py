"""Host layers refused before anything is merged: real git on file://, the shim's HostLayers,
and a merger that fails the test if it is ever asked to run systemd-sysext/-confext (which
cannot run on this machine; tests/system/test_host_layers.py merges for real)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from bitbuilder.hostshim.api import ExtensionType, HostLayersSpec
from bitbuilder.hostshim.config import ShimConfig
from bitbuilder.hostshim.host.layers import HostLayers
from bitbuilder.hostshim.host.merge import Merger
from bitbuilder.hostshim.host.paths import HostPaths, host_root
from tests.helpers.gitserve import Content, TenantRepo

RELEASE = "ID=debian\nVERSION_ID=13\n"
GOOD: dict[str, Content] = {
    "sysext/tools/usr/lib/extension-release.d/extension-release.tools": RELEASE,
    "sysext/tools/usr/bin/tool": "#!/bin/sh\n",
}


def _no_systemd(argv: list[str]) -> subprocess.CompletedProcess[str]:
    raise AssertionError(f"a refused revision must not reach {argv[0]}")


@pytest.fixture
def layers(config: ShimConfig, tmp_path: Path) -> HostLayers:
    os_root = tmp_path / "host-os"
    (os_root / "etc").mkdir(parents=True)
    (os_root / "etc/os-release").write_text('ID=debian\nVERSION_ID="13"\n')
    links = {kind: tmp_path / "links" / kind.value for kind in ExtensionType}
    return HostLayers(config, Merger(host_root(config), links, _no_systemd), os_root)


def spec(repo: TenantRepo) -> HostLayersSpec:
    return HostLayersSpec.model_validate(
        {"name": "base", "source": {"url": repo.file_url(), "ref": {"branch": "main"}}}
    )


@pytest.mark.parametrize(
    ("files", "reason", "where"),
    [
        ({**GOOD, "units/x.service": "[Service]\n"}, "InvalidRevision", "units"),
        (
            {"confext/motd/etc/motd": "hi\n"},
            "InvalidRevision",
            "confext/motd/etc/extension-release.d/extension-release.motd: missing",
        ),
        (
            {
                **GOOD,
                "sysext/tools/usr/lib/extension-release.d/extension-release.tools": "ID=fedora\n",
            },
            "InvalidRevision",
            "ID=fedora does not match the OS (ID=debian)",
        ),
        ({**GOOD, "machine.yaml": "hostname: h\n"}, "InvalidRevision", "machine.yaml"),
    ],
)
def test_a_revision_the_host_must_not_merge_is_refused_and_nothing_merged(
    layers: HostLayers, repo: TenantRepo, files: dict[str, Content], reason: str, where: str
) -> None:
    commit = repo.commit(files)
    status = layers.apply(spec(repo))
    assert status.phase == "Failed" and status.applied_revision is None
    assert status.source_error is not None
    assert status.source_error.reason == reason
    assert status.source_error.revision == f"main@sha1:{commit}"
    assert where in status.source_error.message
    assert layers.merger.owned() == {kind: {} for kind in ExtensionType}
    # The state is kept (0600: it may hold credentials) and the status reads back the same.
    state_file = HostPaths(layers.config, "base").state_file
    assert state_file.stat().st_mode & 0o777 == 0o600
    assert layers.get("base") == status
