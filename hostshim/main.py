"""`bitbuilder-hostshim`: the privileged host shim daemon.

SIGTERM/SIGINT stop serving; the tenants keep running (they are detached from the shim, or
systemd units) and the next shim re-adopts them.
"""

from __future__ import annotations

import argparse
import asyncio
import fcntl
import ipaddress
import logging
import resource
import signal
import socket
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TextIO

from bitbuilder.hostshim.api import limit_bounds, parse_quantity
from bitbuilder.hostshim.capabilities.report import host_report
from bitbuilder.hostshim.config import (
    DEFAULT_RUNTIME_DIR,
    DEFAULT_SOCKET,
    DEFAULT_STATE_DIR,
    ShimConfig,
)
from bitbuilder.hostshim.images.store import ImageStore
from bitbuilder.hostshim.machine.executor import select_executor
from bitbuilder.hostshim.machine.manager import MachineManager
from bitbuilder.hostshim.machine.parts import SourceLike
from bitbuilder.hostshim.machine.runner import Runner
from bitbuilder.hostshim.paths import TenantPaths
from bitbuilder.hostshim.server.app import serve
from bitbuilder.hostshim.source.git import GitSource
from bitbuilder.hostshim.source.layout import load_layout
from bitbuilder.hostshim.state.settings import save_settings
from bitbuilder.hostshim.systemd.activation import listen_socket

log = logging.getLogger("bitbuilder.hostshim")


def port_range(text: str) -> tuple[int, int]:
    """'LOW-HIGH', both unprivileged ports, LOW <= HIGH."""
    low, sep, high = text.partition("-")
    try:
        bounds = (int(low), int(high))
    except ValueError:
        bounds = (0, 0)
    if not sep or not 1024 <= bounds[0] <= bounds[1] <= 65535:
        raise argparse.ArgumentTypeError(f"{text!r}: expected LOW-HIGH within 1024-65535")
    return bounds


def _bytes(text: str, least: int) -> int | None:
    """A Kubernetes quantity of bytes, at least `least` (a spec's own minimum); 0 means none."""
    try:
        value = int(parse_quantity(text))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    if value and value < least:
        raise argparse.ArgumentTypeError(f"{text!r}: at least {least >> 20}Mi (or 0 for none)")
    return value or None


def memory_quantity(text: str) -> int | None:
    return _bytes(text, limit_bounds("memory_bytes")[0])


def disk_quantity(text: str) -> int | None:
    return _bytes(text, limit_bounds("disk_bytes")[0])


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="bitbuilder-hostshim",
        description="Run tenants as nspawn machines from their git repos; serve the shim API "
        "on a unix socket.",
    )
    parser.add_argument(
        "--state-dir",
        type=Path,
        default=DEFAULT_STATE_DIR,
        help="tenant states, repos, images and data (default: %(default)s)",
    )
    parser.add_argument(
        "--runtime-dir",
        type=Path,
        default=DEFAULT_RUNTIME_DIR,
        help="machine roots and consoles (default: %(default)s)",
    )
    parser.add_argument(
        "--socket",
        type=Path,
        default=DEFAULT_SOCKET,
        help="the API's unix socket (default: %(default)s)",
    )
    parser.add_argument(
        "--allow-uid", type=int, action="append", default=[], metavar="N",
        help="uid allowed on the socket (repeatable; default: 0 only)",
    )  # fmt: skip
    parser.add_argument(
        "--allow-gid", type=int, action="append", default=[], metavar="N",
        help="gid allowed on the socket (repeatable); the socket's group becomes the first",
    )  # fmt: skip
    parser.add_argument(
        "--trusted-image-path", type=Path, action="append", default=[], metavar="DIR",
        help="directory that PUT /v1/images may import from (repeatable)",
    )  # fmt: skip
    parser.add_argument(
        "--trusted-image-key", type=Path, action="append", default=[], metavar="FILE",
        help="OpenPGP public key trusted to sign images' SHA256SUMS (repeatable)",
    )  # fmt: skip
    parser.add_argument(
        "--file-source-root", type=Path, action="append", default=[], metavar="DIR",
        help="root under which file:// tenant repos are allowed (repeatable)",
    )  # fmt: skip
    parser.add_argument(
        "--allow-source-network", type=ipaddress.ip_network, action="append", default=[],
        metavar="CIDR",
        help="let tenant source URLs reach this network although it is the host's own "
        "(loopback, link-local, the host's addresses; refused by default; repeatable)",
    )  # fmt: skip
    parser.add_argument(
        "--default-memory", type=memory_quantity, default=ShimConfig.default_memory_bytes,
        metavar="QUANTITY",
        help="memory limit of a machine whose spec sets none, e.g. 512Mi, 2Gi; 0: none "
        "(default: 1Gi)",
    )  # fmt: skip
    parser.add_argument(
        "--tenant-disk-size", type=disk_quantity, default=ShimConfig.tenant_disk_bytes,
        metavar="QUANTITY",
        help="size of a new tenant's writable layer (a loop-mounted ext4 image) where its "
        "spec sets no diskBytes, e.g. 20Gi; 0: no quota (default: 8Gi)",
    )  # fmt: skip
    parser.add_argument(
        "--host-port-range", type=port_range, default=ShimConfig.host_port_range,
        metavar="LOW-HIGH",
        help="host ports a tenant's port forward may take (default: 30000-32767)",
    )  # fmt: skip
    parser.add_argument(
        "--executor", choices=("auto", "direct", "systemd"), default="auto",
        help="auto: systemd units where PID 1 is systemd, else detached processes (default: auto)",
    )  # fmt: skip
    parser.add_argument(
        "--drift-interval", type=float, default=30.0, metavar="SECONDS",
        help="how often to check running machines against their applied revision "
        "(0: never; default: %(default)s)",
    )  # fmt: skip
    parser.add_argument(
        "--check", action="store_true",
        help="print what this host can run (nspawn, vmspawn, KVM, ...) and exit: 0 when "
        "containers can run",
    )  # fmt: skip
    parser.add_argument(
        "-o", "--output", choices=("text", "json"), default="text",
        help="--check's format (default: %(default)s)",
    )  # fmt: skip
    parser.add_argument(
        "--log-level",
        default="INFO",
        choices=("DEBUG", "INFO", "WARNING", "ERROR"),
        help="log verbosity (default: %(default)s)",
    )
    return parser.parse_args(argv)


def config_from(args: argparse.Namespace) -> ShimConfig:
    return ShimConfig(
        state_dir=args.state_dir.absolute(),
        runtime_dir=args.runtime_dir.absolute(),
        socket_path=args.socket.absolute(),
        allowed_uids=frozenset(args.allow_uid or [0]),
        allowed_gids=frozenset(args.allow_gid),
        trusted_image_paths=tuple(p.absolute() for p in args.trusted_image_path),
        trusted_image_keys=tuple(p.absolute() for p in args.trusted_image_key),
        file_source_roots=tuple(p.absolute() for p in args.file_source_root),
        source_networks=tuple(args.allow_source_network),
        host_port_range=args.host_port_range,
        default_memory_bytes=args.default_memory,
        tenant_disk_bytes=args.tenant_disk_size,
        executor=args.executor,
    )


def build_manager(config: ShimConfig) -> MachineManager:
    """The manager over the real git source, image store and runner."""
    images = ImageStore(config)
    runner = Runner(config, images, select_executor(config))

    def source_for(paths: TenantPaths) -> SourceLike:
        return GitSource(paths, config)

    return MachineManager(config, runner, images, source_for, load_layout)


def hold_dirs(config: ShimConfig) -> list[TextIO]:
    """One shim per state dir and per runtime dir, held until this process exits: a second one
    would adopt, stop and restart the first one's machines before it found the socket taken."""
    held: list[TextIO] = []
    for folder in (config.state_dir, config.runtime_dir):
        handle = (folder / "hostshim.lock").open("a")  # not inherited: machines never hold it
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.close()
            for other in held:
                other.close()
            raise RuntimeError(f"another bitbuilder-hostshim uses {folder}") from None
        held.append(handle)
    return held


async def _run(
    manager: MachineManager,
    config: ShimConfig,
    drift_interval: float | None,
    activated: socket.socket | None,
) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await serve(manager, config, stop, drift_interval=drift_interval, activated=activated)
    log.info("stopped serving; machines keep running")


def check(output: str) -> int:
    report = host_report()
    print(report.json_text() if output == "json" else report.text())
    return 0 if report.containers_ok else 1


def raise_fd_limit() -> None:
    """Soft open-files limit up to the hard one: the shim keeps pidfds per running machine
    (liveness, reaping) and uses poll, never select. Its machines do not inherit it: nspawn
    sets a container's soft limit back to 1024."""
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.check:
        return check(args.output)
    activated = listen_socket()  # first: no child may inherit the activation variables
    logging.basicConfig(
        level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    config = config_from(args)
    raise_fd_limit()
    # The state (credentials, tenant data) is root's alone; the runtime dir holds the socket,
    # which allowed non-root callers must be able to reach.
    try:
        config.state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        config.runtime_dir.mkdir(mode=0o755, parents=True, exist_ok=True)
        held = hold_dirs(config)  # before anything touches a machine or a state
    except OSError as exc:  # not root, most likely
        log.error("cannot use the state and runtime dirs: %s (the shim runs as root)", exc)
        return 1
    except RuntimeError as exc:
        log.error("%s", exc)
        return 1
    save_settings(config)  # what setup-tenant@ restores machines with at the next boot
    manager = build_manager(config)
    manager.startup()
    try:
        asyncio.run(_run(manager, config, args.drift_interval or None, activated))
    except RuntimeError as exc:  # e.g. another shim serves the socket
        log.error("%s", exc)
        return 1
    finally:
        for handle in held:
            handle.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
