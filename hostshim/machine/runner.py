"""Start, stop, inspect and re-adopt machines: the image, the tenant's layers, the network and
the executor put together.

A machine's root is an overlay the runner mounts under its run dir: the image rootfs as the
read-only lower layer, the tenant's writable layer (kept across restarts) under its data dir.
The revision's confext trees (and, for systemd images, the repo's units) are layered read-only
over /etc and its sysext trees over /usr by nspawn itself. Every host-side thing a run creates
(mounts, link, filter, cgroups) is derived from the tenant name, so stop can remove
it even after a crash that lost the run record.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import logging
import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from bitbuilder.hostshim.api import ImageStatus, ImageType, MachineSpec, NetworkMode, Runtime
from bitbuilder.hostshim.capabilities.report import host_report, runtime_refusal
from bitbuilder.hostshim.config import ShimConfig
from bitbuilder.hostshim.errors import MachineError, ShimError
from bitbuilder.hostshim.images.store import ImageStore
from bitbuilder.hostshim.machine.datadisk import mount_data, unmount_data
from bitbuilder.hostshim.machine.executor import KILL_DEADLINE, Executor, shim_scope, wait_exit
from bitbuilder.hostshim.machine.layers import layer_sources, machine_layers
from bitbuilder.hostshim.machine.live import LiveMachines
from bitbuilder.hostshim.machine.network import (
    Link,
    configure_link,
    create_tap,
    install_table,
    prepare_link,
    sweep_stale_reservations,
    teardown_link,
)
from bitbuilder.hostshim.machine.runtime.nspawn import (
    InitKind,
    NspawnMachine,
    check_path,
    check_user_namespaces,
    detect_init,
    find_leader,
    init_ready,
    nspawn_argv,
    shut_down,
)
from bitbuilder.hostshim.machine.runtime.vmspawn import (
    VmspawnMachine,
    guest_kernel,
    host_limits,
    vmspawn_argv,
    vmspawn_env,
)
from bitbuilder.hostshim.machine.vm import (
    GUEST_LAYER,
    POWER_OFF_DEADLINE,
    QMP_SOCKET,
    await_guest,
    guest_layer,
    mount_overlay,
    prepare_upper,
    qmp_argument,
    request_power_off,
)
from bitbuilder.hostshim.paths import TenantPaths
from bitbuilder.hostshim.safepath import UnsafePath, remove_tree
from bitbuilder.hostshim.source.git import Checkout
from bitbuilder.hostshim.timing import phase

log = logging.getLogger(__name__)

RECORD = "machine.json"
CONSOLE_LOG = "console.log"
LEADER_DEADLINE = 30.0
STOP_TIMEOUT = 20.0


@dataclass(frozen=True)
class RunningMachine:
    name: str
    leader_pid: int  # the machine's init (PID 1 inside), as the host sees it
    started_at: datetime
    address: str | None
    revision: str | None
    acceleration: str | None = None  # VMs: kvm or tcg


def _poll(probe: Callable[[], int | None], timeout: float) -> int | None:
    """Probe until it answers (a start takes tens of ms; nothing to block on but /proc)."""
    deadline = time.monotonic() + timeout
    while (found := probe()) is None and time.monotonic() < deadline:
        time.sleep(0.005)
    return found


def _umount(path: Path) -> None:
    if not os.path.ismount(path):
        return
    result = subprocess.run(["umount", str(path)], capture_output=True, text=True)
    if result.returncode != 0:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


def _remove(path: Path) -> None:
    """Remove a run or data path; a mount still below it (an unmount that failed) is refused,
    so a removal never deletes through it into the machine's or anyone's files."""
    try:
        remove_tree(path)
    except UnsafePath as exc:
        raise MachineError(str(exc), reason="MountBusy") from exc


def _left_over(paths: TenantPaths) -> bool:
    """Anything of an earlier run that stop() has not cleared (a crash left it).

    A run creates its root mount first and keeps its records (executor's and runner's) in the
    run dir until its stop() has removed everything else, so a run dir with nothing but the
    console log means a clean slate; the machine's filter is replaced by prepare_link anyway."""
    if os.path.ismount(paths.run / "root"):
        return True
    try:
        return any(entry.name != CONSOLE_LOG for entry in paths.run.iterdir())
    except FileNotFoundError:
        return False


def check_spec(spec: MachineSpec) -> None:
    """Refuse what this runner can never start: called before a running machine is stopped."""
    refusal = runtime_refusal(spec.runtime)
    if refusal is not None:
        raise MachineError(
            f"runtime {spec.runtime} cannot run on this host: {refusal}", reason="Unsupported"
        )
    if spec.network.ports and spec.network.mode is not NetworkMode.isolated:
        raise MachineError("port forwards need network mode isolated", reason="InvalidSpec")
    if spec.runtime is Runtime.nspawn:
        check_user_namespaces()


def check_image(spec: MachineSpec, image: ImageStatus) -> None:
    """Refuse an image the spec's runtime cannot boot: called before a running machine stops."""
    if spec.runtime is Runtime.nspawn and image.type is not ImageType.directory:
        raise MachineError(
            f"image {image.name!r} is a raw disk image: runtime nspawn needs a directory or "
            "tarball image (raw images are for vmspawn)",
            reason="ImageTypeUnsupported",
        )
    if spec.runtime is Runtime.vmspawn and image.type is not ImageType.directory:
        raise MachineError(
            f"image {image.name!r} is a raw disk image: this shim boots VMs from directory "
            "images only for now (the guest's address and units go into its root overlay)",
            reason="ImageTypeUnsupported",
        )


class Runner:
    def __init__(
        self,
        config: ShimConfig,
        images: ImageStore,
        executor: Executor,
        await_guests: bool = True,
    ) -> None:
        self.config = config
        self.await_guests = await_guests  # a VM's start returns once it answers ping
        self.images = images
        self.executor = executor
        self.scope = shim_scope(config)
        self.pool = ipaddress.IPv4Network(config.machine_network_pool)
        self._guard = threading.Lock()
        self._locks: dict[str, threading.RLock] = {}
        self._live: LiveMachines[RunningMachine] = LiveMachines()

    def _lock(self, name: str) -> threading.RLock:
        """One lock per machine: start, stop and remove_data of one name never interleave."""
        with self._guard:
            return self._locks.setdefault(name, threading.RLock())

    # --- start -----------------------------------------------------------------------------

    def start(self, spec: MachineSpec, checkout: Checkout | None) -> RunningMachine:
        check_spec(spec)
        paths = TenantPaths(self.config, spec.name)
        with self._lock(spec.name):
            if self.executor.pid(spec.name) is not None:
                raise MachineError(
                    f"machine {spec.name!r} is already running", reason="AlreadyRunning"
                )
            rootfs = self.images.rootfs(spec.image)
            if _left_over(paths):
                self.stop(spec.name)
            paths.run.mkdir(parents=True, exist_ok=True)
            try:
                return self._start(spec, checkout, paths, rootfs)
            except BaseException:
                self.stop(spec.name)
                raise

    def _start(
        self, spec: MachineSpec, checkout: Checkout | None, paths: TenantPaths, rootfs: Path
    ) -> RunningMachine:
        if spec.runtime is Runtime.vmspawn:
            return self._start_vm(spec, checkout, paths, rootfs)
        init = detect_init(rootfs)
        with phase(spec.name, "mount data, root"):
            mount_data(paths, spec.resources.disk_bytes or self.config.tenant_disk_bytes)
            root = self._mount_root(paths, rootfs)
        layout = checkout.layout if checkout is not None else None
        with phase(spec.name, "layers"):
            etc_layers, usr_layers = machine_layers(paths.run, layout, init is InitKind.systemd)
        link = None
        if spec.network.mode is NetworkMode.isolated:
            with phase(spec.name, "network: link, nftables"):
                link = prepare_link(self.scope, spec.name, spec.network, self.pool)
        started_at = datetime.now(UTC)
        revision = checkout.revision if checkout is not None else None
        self._write_record(paths, link, started_at, revision, init)
        settings = layout.settings if layout is not None else None
        machine = NspawnMachine(
            name=spec.name,
            root=root,
            veth=(link.host_ifname, link.machine_ifname) if link else None,
            init=init,
            etc_layers=etc_layers,
            usr_layers=usr_layers,
            hostname=settings.hostname if settings and "hostname" in spec.repo_settings else None,
            environment=dict(settings.environment)
            if settings and "environment" in spec.repo_settings
            else {},
            idmapped=layer_sources(paths.run, layout),
        )
        pid = self.executor.launch(
            spec.name, nspawn_argv(machine), spec.resources, paths.run / CONSOLE_LOG
        )
        leader = self._await_leader(spec.name, pid, paths, init)
        if link is not None:
            with phase(spec.name, "network: configure inside"):
                configure_link(link, leader)
        address = link.address if link else None
        running = RunningMachine(spec.name, leader, started_at, address, revision)
        self._remember(running, pid, self._live.generation(spec.name))
        return running

    def _remember(self, machine: RunningMachine, pid: int, generation: int) -> None:
        self._live.put(
            machine.name, machine, pid, generation, lambda: self.executor.pid(machine.name) == pid
        )

    def _start_vm(
        self, spec: MachineSpec, checkout: Checkout | None, paths: TenantPaths, rootfs: Path
    ) -> RunningMachine:
        """A VM: its root overlay (see vm.py), its tap, vmspawn; Running once it answers."""
        boot = guest_kernel(rootfs)
        layout = checkout.layout if checkout is not None else None
        link = None
        if spec.network.mode is NetworkMode.isolated:
            with phase(spec.name, "network: tap, nftables"):
                link = prepare_link(self.scope, spec.name, spec.network, self.pool)
                create_tap(link)
        with phase(spec.name, "mount data, root"):
            mount_data(paths, spec.resources.disk_bytes or self.config.tenant_disk_bytes)
            guest = guest_layer(paths.run / GUEST_LAYER, layout, link)
            root = self._root_dirs(paths)
            prepare_upper(paths.data / "upper", rootfs)
            mount_overlay(root, [guest, rootfs], paths.data / "upper", paths.data / "work")
        acceleration = host_report().acceleration
        started_at = datetime.now(UTC)
        revision = checkout.revision if checkout is not None else None
        self._write_record(
            paths, link, started_at, revision, InitKind.systemd, Runtime.vmspawn, acceleration
        )
        settings = layout.settings if layout is not None else None
        machine = VmspawnMachine(
            name=spec.name,
            directory=root,
            raw=None,
            boot=boot,
            kvm=acceleration == "kvm",
            tap=link.host_ifname if link else None,
            resources=spec.resources,
            hostname=settings.hostname if settings and "hostname" in spec.repo_settings else None,
        )
        pid = self.executor.launch(
            spec.name,
            vmspawn_argv(machine),
            host_limits(spec.resources),
            paths.run / CONSOLE_LOG,
            env=vmspawn_env(machine, qmp_argument(paths.run / QMP_SOCKET)),
        )
        if link is not None and self.await_guests:
            with phase(spec.name, "guest boot (answers on its address)"):
                await_guest(link.address, lambda: self._alive(spec.name, paths))
        address = link.address if link else None
        running = RunningMachine(spec.name, pid, started_at, address, revision, acceleration)
        self._remember(running, pid, self._live.generation(spec.name))
        return running

    def _alive(self, name: str, paths: TenantPaths) -> None:
        if self.executor.pid(name) is None:
            log = (paths.run / CONSOLE_LOG).read_text(errors="replace")[-2000:]
            raise MachineError(f"machine {name!r} exited while starting: {log.strip()}")

    @staticmethod
    def _root_dirs(paths: TenantPaths) -> Path:
        """The writable layer's dirs and the mount point; returns the mount point."""
        upper, work, root = paths.data / "upper", paths.data / "work", paths.run / "root"
        for d in (upper, work, root):
            d.mkdir(parents=True, exist_ok=True)
        return root

    def _mount_root(self, paths: TenantPaths, rootfs: Path) -> Path:
        root = self._root_dirs(paths)
        upper, work = paths.data / "upper", paths.data / "work"
        # metacopy: nspawn's one-time chown into the picked uid range copies metadata only.
        # nodev: a device node in the image (a directory import keeps them) must not open a
        # host device; nspawn mounts the machine's own /dev.
        options = ",".join(
            [f"lowerdir={check_path(rootfs)}", f"upperdir={check_path(upper)}",
             f"workdir={check_path(work)}", "metacopy=on", "redirect_dir=on", "nodev"]
        )  # fmt: skip
        result = subprocess.run(
            ["mount", "-t", "overlay", "overlay", "-o", options, str(root)],
            capture_output=True,
            text=True,
        )
        if result.returncode != 0:
            raise MachineError(f"cannot mount the machine's root: {result.stderr.strip()}")
        return root

    def _await_leader(self, name: str, pid: int, paths: TenantPaths, init: InitKind) -> int:
        def leader() -> int | None:
            self._alive(name, paths)
            return find_leader(pid)

        def ready() -> int | None:
            self._alive(name, paths)
            return init_ready(pid, init)

        deadline = time.monotonic() + LEADER_DEADLINE
        # Two waits only so the timing shows nspawn's own start apart from init's.
        with phase(name, "nspawn start (uid shift, mounts)"):
            found = _poll(leader, LEADER_DEADLINE)
        if found is not None:
            with phase(name, "init ready"):
                found = _poll(ready, deadline - time.monotonic())
        if found is None:
            raise MachineError(f"machine {name!r} did not start within {LEADER_DEADLINE:.0f}s")
        return found

    def _write_record(
        self,
        paths: TenantPaths,
        link: Link | None,
        started_at: datetime,
        revision: str | None,
        init: InitKind,
        runtime: Runtime = Runtime.nspawn,
        acceleration: str | None = None,
    ) -> None:
        record = {
            "link": link.to_json() if link else None,
            "startedAt": started_at.isoformat(),
            "revision": revision,
            "init": init.value,
            "runtime": runtime.value,
            "acceleration": acceleration,
        }
        tmp = paths.run / f"{RECORD}.tmp"
        tmp.write_text(json.dumps(record))
        tmp.rename(paths.run / RECORD)

    # --- queries ---------------------------------------------------------------------------

    def inspect(self, name: str) -> RunningMachine | None:
        """The running machine: the same object for as long as its process lives (a status
        read checks liveness with one poll); read from the records when not known yet."""
        known = self._live.get(name)
        if known is not None:
            return known
        generation = self._live.generation(name)  # before the reads: a stop meanwhile wins
        pid = self.executor.pid(name)
        if pid is None:
            return None
        try:
            record = json.loads((TenantPaths(self.config, name).run / RECORD).read_text())
        except FileNotFoundError:
            return None
        link = Link.from_json(record["link"]) if record.get("link") else None
        # A VM's own process is its leader (qemu runs beside it, in the same pid namespace).
        vm = record.get("runtime") == Runtime.vmspawn.value
        leader = pid if vm else find_leader(pid)
        machine = RunningMachine(
            name=name,
            leader_pid=leader or pid,
            started_at=datetime.fromisoformat(record["startedAt"]),
            address=link.address if link else None,
            revision=record.get("revision"),
            acceleration=record.get("acceleration"),
        )
        if leader is not None:  # before init runs, the leader is still to be found
            self._remember(machine, pid, generation)
        return machine

    def adopt(self) -> dict[str, RunningMachine]:
        """The machines that run (at shim start), once leftovers of crashed starts are swept
        and the shared filter table has this shim's rules."""
        sweep_stale_reservations()
        try:
            install_table()
        except ShimError as exc:  # nft missing, say: each start reports it where it matters
            log.warning("%s", exc.message)
        found = {}
        for name in self.executor.running():
            machine = self.inspect(name)
            if machine is not None:
                found[name] = machine
        return found

    # --- stop ------------------------------------------------------------------------------

    def stop(self, name: str) -> None:
        """Power the machine off and remove everything its run created; keeps its data."""
        paths = TenantPaths(self.config, name)
        with self._lock(name):
            self._live.forget(name)
            with phase(name, "stop: machine"):
                self._power_off(name, paths)
                self.executor.terminate(name, STOP_TIMEOUT)
            with phase(name, "stop: link, mounts"):
                teardown_link(self.scope, name)
                _umount(paths.run / "root")
                unmount_data(paths)
            if paths.run.is_dir():
                for entry in paths.run.iterdir():
                    if entry.name == CONSOLE_LOG:
                        continue
                    _remove(entry)
            self._live.forget(name)  # again: a read during the stop may have seen it alive

    def _power_off(self, name: str, paths: TenantPaths) -> None:
        """Power a busybox-style machine off without its init's fixed pauses (2 s of its 2.1):
        the init runs its shutdown actions and ends every process as it always does, and is
        killed only once nothing but those pauses is left. Any other machine, or one whose init
        cannot take the signal yet, is left to the executor's terminate()."""
        pid = self.executor.pid(name)
        if pid is None:
            return
        if self._recorded(paths, "runtime") == Runtime.vmspawn.value:
            # The guest's ACPI power button; what is left at the deadline is terminate()'s.
            if request_power_off(paths.run / QMP_SOCKET):
                wait_exit(pid, POWER_OFF_DEADLINE)
            return
        if self._recorded(paths, "init") != InitKind.other.value:
            return
        leader = init_ready(pid, InitKind.other)
        if leader is None:
            return
        try:
            fd = os.pidfd_open(leader)  # the signals reach this process, never a reused pid
        except ProcessLookupError:
            return
        try:
            if find_leader(pid) != leader:
                return
            signal.pidfd_send_signal(fd, InitKind.other.kill_signo)
            if _poll(lambda: leader if shut_down(leader) else None, STOP_TIMEOUT) is None:
                return
            with contextlib.suppress(ProcessLookupError):
                signal.pidfd_send_signal(fd, signal.SIGKILL)
        finally:
            os.close(fd)
        wait_exit(pid, KILL_DEADLINE)  # nspawn sees its machine gone and exits

    @staticmethod
    def _recorded(paths: TenantPaths, key: str) -> object:
        try:
            return json.loads((paths.run / RECORD).read_text()).get(key)
        except (FileNotFoundError, json.JSONDecodeError):
            return None

    def remove_data(self, name: str) -> None:
        with self._lock(name):
            if self.executor.pid(name) is not None:
                raise MachineError(f"machine {name!r} is running: stop it first", reason="Running")
            paths = TenantPaths(self.config, name)
            unmount_data(paths)
            _remove(paths.data)
            paths.data_image.unlink(missing_ok=True)
            _remove(paths.run)
