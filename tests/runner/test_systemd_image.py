"""A systemd image (Debian trixie) under the runner: repo units run, confext read, clean halt.

The image is the system tests' cached test-host tarball (tests/system/testhost.py builds it
once, under a lock, for both). It used to be skipped when this test ran before the system
tests had built it, that is on every cold CI run. Importing it through ImageStore also runs
the tarball path (zstd, sha256, member checks) over a real root fs.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from bitbuilder.hostshim.api import ImageSpec
from bitbuilder.hostshim.images.store import ImageStore
from bitbuilder.hostshim.machine.executor import DirectExecutor
from bitbuilder.hostshim.machine.runner import Runner
from bitbuilder.hostshim.source.git import Checkout
from bitbuilder.hostshim.source.layout import Layout, RepoSettings
from tests.helpers.wait import wait_for
from tests.runner.conftest import Shim, needs_nspawn, runner_config, stop_all, unique_name
from tests.system.testhost import ensure_tarball, missing_prerequisites

HELLO_UNIT = """\
[Service]
Type=oneshot
RemainAfterExit=yes
ExecStart=/bin/sh -c 'cat /etc/greeting > /run/hello'
[Install]
WantedBy=multi-user.target
"""


@pytest.mark.nspawn
@pytest.mark.slow
@needs_nspawn
def test_systemd_image_runs_repo_units(tmp_path: Path) -> None:
    problems = missing_prerequisites()
    if problems:
        pytest.skip("cannot build the test-host image here: " + ", ".join(problems))
    tarball = ensure_tarball()
    config = runner_config(tmp_path, tarball.parent)
    images = ImageStore(config)
    sha = hashlib.sha256(tarball.read_bytes()).hexdigest()
    images.put("trixie", ImageSpec(url=tarball.as_uri(), sha256=sha))
    executor = DirectExecutor(config)
    shim = Shim(config, images, executor, Runner(config, images, executor))
    tree = tmp_path / "revision"
    (tree / "units").mkdir(parents=True)
    (tree / "confext/base/etc").mkdir(parents=True)
    (tree / "confext/base/etc/greeting").write_text("hello from the repo\n")
    (tree / "units/hello.service").write_text(HELLO_UNIT)
    layout = Layout(
        root=tree,
        sysext={},
        confext={"base": tree / "confext/base"},
        units={"hello.service": tree / "units/hello.service"},
        settings=RepoSettings(),
    )
    name = unique_name("sd")
    try:
        machine = shim.start(
            name, checkout=Checkout("e" * 40, "main", tree, layout), image="trixie"
        )

        def state() -> str | None:
            out = shim.run_in(machine, "systemctl", "is-system-running").stdout.strip()
            return out if out in ("running", "degraded") else None

        wait_for(state, 60, 0.1, what="systemd up")
        active = shim.run_in(machine, "systemctl", "is-active", "hello.service").stdout
        assert active.strip() == "active"
        assert shim.run_in(machine, "cat", "/run/hello").stdout == "hello from the repo\n"
    finally:
        stop_all(shim)
    log = (config.runtime_dir / "machines" / name / "console.log").read_text()
    assert "Halting system" in log or "Powering off" in log, "a clean shutdown, not a kill"
