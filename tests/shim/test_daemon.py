"""`bitbuilder-hostshim` as its own process: serves on the socket, stops on SIGTERM, and the
tenants it started outlive it (the next shim process re-adopts them)."""

from __future__ import annotations

import os
import signal
import socket
import stat
import subprocess
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

import pytest

from bitbuilder.hostshim.config import ShimConfig
from bitbuilder.hostshim.main import main, parse_args
from bitbuilder.hostshim.systemd.restore import restore_config
from tests.helpers.gitserve import TenantRepo
from tests.helpers.wait import wait_for
from tests.shim.conftest import RealShim, real_config
from tests.shim.harness import DAEMON, ShimClient, daemon_argv


def _healthy(client: ShimClient) -> bool:
    try:
        return client.request("GET", "/healthz").status == 200
    except OSError:
        return False


# Put the passed socket at fd 3, name this process in LISTEN_PID, exec the daemon (same pid).
_ACTIVATE = """
import os, sys
os.dup2(int(sys.argv[1]), 3)
os.environ.update(LISTEN_PID=str(os.getpid()), LISTEN_FDS="1")
os.execv(sys.argv[2], sys.argv[2:])
"""


@contextmanager
def daemon(
    config: ShimConfig,
    log: Path,
    activated: socket.socket | None = None,
    extra: Sequence[str] = (),
) -> Iterator[subprocess.Popen[bytes]]:
    argv = [*daemon_argv(config), *extra]
    passed: tuple[int, ...] = ()
    if activated is not None:  # what systemd does: the socket as fd 3, LISTEN_PID = the service
        passed = (activated.fileno(),)
        argv = [sys.executable, "-c", _ACTIVATE, str(passed[0]), *argv]
    with log.open("ab") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, pass_fds=passed)
    try:
        client = ShimClient(str(config.socket_path))
        wait_for(lambda: proc.poll() is not None or _healthy(client), what="the shim to serve")
        assert proc.poll() is None, log.read_text()
        yield proc
    finally:
        if proc.poll() is None:
            proc.terminate()
            proc.wait(30)


def test_daemon_serves_then_stops_on_sigterm(tmp_path: Path) -> None:
    config = real_config(tmp_path)
    with daemon(config, tmp_path / "shim.log") as proc:
        client = ShimClient(str(config.socket_path))
        assert client.request("GET", "/v1/machines").body == {"items": []}
        modes = {p: stat.S_IMODE(p.stat().st_mode) for p in (config.state_dir, config.runtime_dir)}
        assert modes == {config.state_dir: 0o700, config.runtime_dir: 0o755}
        assert stat.S_IMODE(config.socket_path.stat().st_mode) == 0o660
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    assert not config.socket_path.exists()


def test_boot_restore_uses_the_machine_settings_the_shim_ran_with(tmp_path: Path) -> None:
    """setup-tenant@ runs restore without the shim's flags: it used to restore a tenant with a
    1Gi memory limit and an 8Gi disk whatever the shim was started with."""
    config = real_config(tmp_path)
    built_in = restore_config(config.state_dir, config.runtime_dir, "direct")  # nothing saved
    assert built_in.default_memory_bytes == ShimConfig.default_memory_bytes
    assert built_in.tenant_disk_bytes == ShimConfig.tenant_disk_bytes
    flags = ["--default-memory", "0", "--tenant-disk-size", "128Mi"]
    with daemon(config, tmp_path / "shim.log", extra=flags):
        restored = restore_config(config.state_dir, config.runtime_dir, "direct")
    assert restored.default_memory_bytes is None
    assert restored.tenant_disk_bytes == 128 << 20
    (config.state_dir / "shim-settings.json").write_text("{garbage")
    fallback = restore_config(config.state_dir, config.runtime_dir, "direct")
    assert fallback.default_memory_bytes == ShimConfig.default_memory_bytes


def test_daemon_uses_a_socket_systemd_passed(tmp_path: Path) -> None:
    config = real_config(tmp_path)
    config.socket_path.parent.mkdir(parents=True)
    listening = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listening.bind(str(config.socket_path))
    listening.listen(8)
    try:
        # A live socket at the path: a shim that tried to bind it itself would refuse to start.
        with daemon(config, tmp_path / "shim.log", activated=listening) as proc:
            assert ShimClient(str(config.socket_path)).request("GET", "/healthz").status == 200
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(30) == 0
        assert config.socket_path.exists(), "the socket belongs to systemd: left in place"
    finally:
        listening.close()


@pytest.mark.nspawn
@pytest.mark.skipif(os.geteuid() != 0, reason="needs root and systemd-nspawn")
def test_tenant_outlives_the_shim_process(tmp_path: Path, busybox_rootfs: Path) -> None:
    rootfs = busybox_rootfs
    config = real_config(tmp_path, trusted_image_paths=(rootfs.parent,))
    client = ShimClient(str(config.socket_path))
    repo = TenantRepo(tmp_path / "served", "web.git")
    repo.commit({"confext/base/etc/motd": "v1\n"})
    try:
        with daemon(config, tmp_path / "shim.log") as proc:
            assert client.request("PUT", "/v1/images/busybox", {"path": str(rootfs)}).status == 200
            body = {
                "name": "web",
                "image": "busybox",
                "source": {"url": repo.file_url(), "ref": {"branch": "main"}},
                "network": {"mode": "none"},
            }
            first = client.put(body).body
            assert first["phase"] == "Running", first
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(30) == 0
        assert Path(f"/proc/{first['leaderPid']}").exists(), "the tenant died with the shim"
        with daemon(config, tmp_path / "shim.log"):
            again = client.get("web").body
            assert again["phase"] == "Running" and again["leaderPid"] == first["leaderPid"]
    finally:
        RealShim(config).stop_all()


@pytest.mark.parametrize("shared", ["state_dir", "runtime_dir"])
def test_a_second_daemon_on_the_same_dirs_refuses_to_start(tmp_path: Path, shared: str) -> None:
    """A second shim would adopt (and stop) the first one's machines: it must not even start."""
    (tmp_path / "first").mkdir()
    (tmp_path / "second").mkdir()
    config = real_config(tmp_path / "first")
    other = real_config(tmp_path / "second")
    other = replace(other, **{shared: getattr(config, shared)})
    with daemon(config, tmp_path / "shim.log"):
        second = subprocess.run(
            [DAEMON, "--state-dir", str(other.state_dir), "--runtime-dir",
             str(other.runtime_dir), "--socket", str(other.socket_path), "--executor", "direct"],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert second.returncode == 1
        assert f"another bitbuilder-hostshim uses {getattr(config, shared)}" in second.stderr
        assert not other.socket_path.exists(), "the second shim served"
        assert _healthy(ShimClient(str(config.socket_path)))


def test_help_shows_the_default_dirs(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        parse_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps long lines
    for default in ("/var/lib/bitbuilder", "/run/bitbuilder", "/run/bitbuilder/hostshim.sock"):
        assert f"(default: {default})" in text


def test_unusable_state_dir_is_an_error_message(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """What a shim started without root sees: one line naming the dir, no traceback."""
    (tmp_path / "file").write_text("")
    argv = ["--state-dir", str(tmp_path / "file" / "state"), "--runtime-dir", str(tmp_path)]
    assert main([*argv, "--socket", str(tmp_path / "s.sock")]) == 1
    assert "cannot use the state and runtime dirs" in caplog.text
    assert str(tmp_path / "file" / "state") in caplog.text
