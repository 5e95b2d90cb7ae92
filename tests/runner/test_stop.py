"""Stopping a busybox machine: its init's shutdown work is done in full, its fixed pauses are
skipped (the machine is killed once nothing but them is left)."""

from __future__ import annotations

from bitbuilder.hostshim.machine.runner import CONSOLE_LOG
from bitbuilder.hostshim.paths import TenantPaths
from tests.helpers.wait import wait_for
from tests.runner.conftest import Shim, assert_gone, needs_nspawn, unique_name

pytestmark = needs_nspawn

# A shutdown action that takes a while, and a process that does work when it gets SIGTERM.
INITTAB = """\
::respawn:/bin/busybox httpd -f -p 8080 -h /srv/www
::once:/bin/sh -c 'trap "echo ended > /root/term-handled; exit 0" TERM; while :; do sleep 1; done'
::shutdown:/bin/sh -c 'sleep 0.3; echo ran > /root/shutdown-ran'
"""


def test_stop_waits_for_shutdown_actions_and_term_handlers(shim: Shim) -> None:
    name = unique_name()
    paths = TenantPaths(shim.config, name)
    upper = paths.data / "upper"
    (upper / "etc").mkdir(parents=True)
    (upper / "etc/inittab").write_text(INITTAB)
    machine = shim.start(name)
    wait_for(
        lambda: "trap" in shim.run_in(machine, "ps", "-o", "args").stdout,
        what="the process that handles SIGTERM",
    )
    left = shim.leftovers(name)

    shim.runner.stop(name)

    assert_gone(left)
    assert (upper / "root/shutdown-ran").read_text() == "ran\n"
    assert (upper / "root/term-handled").read_text() == "ended\n"
    console = (paths.run / CONSOLE_LOG).read_text()
    assert "Sent SIGTERM to all processes" in console
    assert "Sent SIGKILL" not in console, "killed before init's pause (1 s) ended"
