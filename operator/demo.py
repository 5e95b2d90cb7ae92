"""`bitbuilder demo`: the whole story on one host, in a couple of minutes, as root.

A base image, two tenants in a fleet repo, their config repos served by `git daemon` on
loopback, the host shim and the standalone reconciler; then a commit rolls out to one tenant
and a revert rolls it back, each shown by the revision and by a file read inside the running
machine. Everything is cleaned up at the end unless --keep.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import aiohttp
import yaml

from bitbuilder.hostshim.api import ImageSpec, MachinePhase
from bitbuilder.operator.demohost import (
    CHILDREN,
    DemoError,
    Processes,
    Repo,
    build_base_image,
    free_port,
    git,
    start_git_daemon,
    stop_recorded,
    tool,
    wait_port,
)
from bitbuilder.operator.get import render
from bitbuilder.operator.localstate import LocalState, utcnow
from bitbuilder.operator.shimclient import ShimClient
from bitbuilder.operator.status import blocking_problem
from bitbuilder.operator.webhook import sign

# Distinct names: on a systemd host machine units and machined names are host-wide.
TENANTS = ("demo-web", "demo-api")
CHANGED = TENANTS[0]
IMAGE = "busybox"
MOTD = "etc/motd"
STEP_TIMEOUT = 180.0


def say(text: str = "") -> None:
    print(text, flush=True)


@contextmanager
def step(title: str) -> Iterator[None]:
    say(f"==> {title}")
    started = time.monotonic()
    yield
    say(f"    done in {time.monotonic() - started:.1f}s")


def motd(name: str, version: str) -> dict[str, str]:
    return {f"confext/motd/{MOTD}": f"{name} {version}: hello from the {name} tenant\n"}


def manifest(name: str, url: str) -> dict[str, object]:
    return {
        "apiVersion": "bitbuilder.io/v1alpha1",
        "kind": "Tenant",
        "metadata": {"name": name},
        "spec": {
            "runtime": "nspawn",
            "image": {"name": IMAGE},
            "source": {"url": url, "ref": {"branch": "main"}, "interval": "30s"},
            "resources": {"cpu": "500m", "memory": "128Mi", "tasks": 64},
        },
    }


def preflight() -> None:
    problems = []
    if os.geteuid() != 0:
        problems.append("run it as root (it starts containers)")
    for binary, package in (("systemd-nspawn", "systemd-container"), ("git", "git")):
        if shutil.which(binary) is None:
            problems.append(f"{binary} is missing (apt-get install {package})")
    if not any(Path(p).is_file() for p in ("/bin/busybox", "/usr/bin/busybox")):
        problems.append("busybox is missing (apt-get install busybox-static)")
    if problems:
        raise DemoError("cannot run the demo:\n  " + "\n  ".join(problems))


class Demo:
    def __init__(self, work: Path) -> None:
        self.work = work
        self.procs = Processes(work / "logs")
        self.socket = work / "run" / "hostshim.sock"
        self.state = LocalState(work / "standalone")
        self.repos: dict[str, Repo] = {}
        self.initial: dict[str, str] = {}  # tenant -> its first commit
        self.git_port = 0
        self.hook_port = 0
        self.hook_secret = os.urandom(24).hex().encode()

    # --- the story ----------------------------------------------------------------------------

    async def run(self) -> None:
        with step("building the base image (a busybox root filesystem)"):
            build_base_image(self.work / "images" / IMAGE)
        with step(f"creating the fleet repo and the tenant repos of {', '.join(TENANTS)}"):
            self.create_repos()
        with step("starting the host shim"):
            await self.start_shim()
        with step("starting the standalone reconciler (bitbuilder run --fleet ...)"):
            self.start_reconciler()
        await self.wait_revisions(self.initial, "both tenants Running")
        await self.show()

        repo = self.repos[CHANGED]
        say(f"==> committing a change to the {CHANGED} tenant's repo (motd v2)")
        change = repo.commit(motd(CHANGED, "v2"), "motd: v2")
        await self.rollout(CHANGED, change, "update")

        say(f"==> reverting that commit in git (git revert {change[:7]})")
        revert = repo.revert(change)
        await self.rollout(CHANGED, revert, "rollback")
        first = self.initial[CHANGED]
        same = git("rev-parse", f"{revert}^{{tree}}", cwd=repo.work) == git(
            "rev-parse", f"{first}^{{tree}}", cwd=repo.work
        )
        say(f"    {revert[:7]} has {'exactly' if same else 'NOT'} the tree of {first[:7]} (v1)")
        record = self.state.load(CHANGED)
        applied = record.status.history if record and record.status else []
        history = ", ".join(h.revision.rpartition("sha1:")[2][:7] for h in applied)
        say(f"    applied revisions of {CHANGED}, newest first: {history}")
        say("==> the demo worked: two tenants ran, an update rolled out and was rolled back")

    def create_repos(self) -> None:
        served = self.work / "git"
        served.mkdir(parents=True)
        self.git_port = start_git_daemon(self.procs, served)
        fleet = Repo.create(served, self.work / "src", "fleet")
        files: dict[str, str] = {}
        for name in TENANTS:
            repo = Repo.create(served, self.work / "src", name)
            self.initial[name] = repo.commit(motd(name, "v1"), "motd: v1")
            self.repos[name] = repo
            doc = manifest(name, self.url(name))
            files[f"tenants/{name}.yaml"] = yaml.safe_dump(doc, sort_keys=False)
        files["tenants/kustomization.yaml"] = yaml.safe_dump(
            {"resources": [f"{n}.yaml" for n in TENANTS]}
        )
        fleet.commit(files, "two tenants")
        say(f"    served by git daemon at git://127.0.0.1:{self.git_port}/")
        for name in ("fleet", *TENANTS):
            say(f"      {self.url(name)}")

    def url(self, name: str) -> str:
        return f"git://127.0.0.1:{self.git_port}/{name}.git"

    async def start_shim(self) -> None:
        self.procs.start(
            "hostshim",
            [tool("bitbuilder-hostshim"), "--state-dir", str(self.work / "shim"),
             "--runtime-dir", str(self.work / "run"), "--socket", str(self.socket),
             "--trusted-image-path", str(self.work / "images"),
             "--allow-source-network", "127.0.0.1/32"],  # the demo's git daemon
        )  # fmt: skip
        async with ShimClient(self.socket, timeout=5) as shim:
            await self.until("the shim to answer", lambda: _answer(shim.healthy()))
            image = await shim.put_image(IMAGE, ImageSpec(path=str(self.work / "images" / IMAGE)))
        say(f"    socket {self.socket}; image {image.name!r} imported ({image.size_bytes} bytes)")

    def start_reconciler(self) -> None:
        secret = self.work / "webhook.secret"
        secret.write_bytes(self.hook_secret)
        secret.chmod(0o600)
        self.hook_port = free_port()
        proc = self.procs.start(
            "reconciler",
            [tool("bitbuilder"), "run", "--fleet", self.url("fleet"), "--fleet-path", "tenants",
             "--fleet-interval", "5s", "--socket", str(self.socket),
             "--state-dir", str(self.state.root), "--webhook-listen", f"127.0.0.1:{self.hook_port}",
             "--webhook-secret-file", str(secret)],
        )  # fmt: skip
        wait_port(self.hook_port, proc)
        say(f"    fleet {self.url('fleet')}, webhook on http://127.0.0.1:{self.hook_port}/hook")

    async def rollout(self, name: str, commit: str, what: str) -> None:
        say(f"    pushed {commit[:7]}; notifying the webhook like a git forge would")
        started = time.monotonic()
        triggered = await self.notify(self.url(name))
        say(f"    webhook triggered: {', '.join(triggered) or 'nothing'}")
        await self.wait_revisions({name: commit}, f"{name} at {commit[:7]}")
        say(f"    {what} of {name} running {time.monotonic() - started:.1f}s after the push")
        await self.show()

    async def notify(self, url: str) -> list[str]:
        body = json.dumps({"ref": "refs/heads/main", "repository": {"clone_url": url}}).encode()
        headers = {"X-Gitea-Signature": sign(self.hook_secret, body), "X-Gitea-Event": "push"}
        async with (
            aiohttp.ClientSession() as http,
            http.post(f"http://127.0.0.1:{self.hook_port}/hook", data=body, headers=headers) as r,
        ):
            if r.status != 202:
                raise DemoError(f"webhook answered {r.status}: {await r.text()}")
            triggered: list[str] = (await r.json())["triggered"]
            return triggered

    # --- watching -----------------------------------------------------------------------------

    async def wait_revisions(self, wanted: dict[str, str], what: str) -> None:
        def progress() -> tuple[bool, str]:
            parts, done = [], True
            for name, commit in wanted.items():
                record = self.state.load(name)
                status = record.status if record else None
                phase = status.phase.value if status and status.phase else "Pending"
                problem = blocking_problem(status)
                if problem is not None:  # it will not get there: say why now, not at the timeout
                    raise DemoError(f"{name} is {phase} ({problem}) while waiting for {what}")
                at = status.applied_revision or "" if status else ""
                ok = phase == "Running" and at.endswith(commit)
                done = done and ok
                parts.append(f"{name}: {phase}{'' if ok else ' (waiting)'}")
            return done, ", ".join(parts)

        await self.until(what, lambda: _answer_sync(progress))

    async def until(self, what: str, check: Callable[[], Awaitable[tuple[bool, str]]]) -> None:
        say(f"    waiting for {what} ...")
        deadline = time.monotonic() + STEP_TIMEOUT
        last = ""
        while True:
            self.procs.check()
            done, detail = await check()
            if detail and detail != last:
                say(f"      {detail}")
                last = detail
            if done:
                return
            if time.monotonic() > deadline:
                raise DemoError(f"timed out after {STEP_TIMEOUT:.0f}s waiting for {what}")
            await asyncio.sleep(0.2)

    async def show(self) -> None:
        say()
        for line in render(self.state.records(), "table", utcnow()).splitlines():
            say(f"    {line}")
        say()
        async with ShimClient(self.socket, timeout=5) as shim:
            for name in TENANTS:
                machine = await shim.get(name)
                pid = (
                    machine.leader_pid
                    if machine and machine.phase is MachinePhase.running
                    else None
                )
                say(f"    inside {name}: /{MOTD} says: {_read_inside(pid)}")
        say()

    # --- cleaning up --------------------------------------------------------------------------

    async def remove_machines(self) -> None:
        """Every machine of the demo's own shim (it runs nothing else)."""
        if not self.socket.exists():
            return
        async with ShimClient(self.socket, timeout=5) as shim:
            if not await shim.healthy():
                return
            for machine in await shim.machines():
                await shim.delete(machine.name)


def _read_inside(pid: int | None) -> str:
    if pid is None:
        return "(not running)"
    try:
        return (Path(f"/proc/{pid}/root") / MOTD).read_text().strip()
    except OSError as exc:
        return f"(cannot look inside: {exc.strerror})"


async def _answer(result: Awaitable[bool]) -> tuple[bool, str]:
    return await result, ""


async def _answer_sync(check: Callable[[], tuple[bool, str]]) -> tuple[bool, str]:
    return check()


def run_demo(workdir: Path | None, keep: bool) -> int:
    try:
        preflight()
    except DemoError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if workdir is not None and workdir.exists() and any(workdir.iterdir()):
        # the clean-up removes the whole folder: never one that holds something else
        print(f"error: --workdir {workdir} is not empty", file=sys.stderr)
        return 2
    work = workdir or Path(tempfile.mkdtemp(prefix="bitbuilder-demo-", dir="/var/tmp"))
    work.mkdir(parents=True, exist_ok=True)
    say(f"BitBuilder demo in {work}")
    demo = Demo(work)
    failed = interrupted = False
    try:
        asyncio.run(demo.run())
    except (DemoError, OSError) as exc:
        failed = True
        print(f"error: {exc}", file=sys.stderr)
        print(f"logs: {demo.procs.logs}", file=sys.stderr)
    except KeyboardInterrupt:  # Ctrl-C: clean up and say so, no traceback
        interrupted = True
        print("interrupted", file=sys.stderr)
    finally:
        if keep:
            say_kept(demo)
        else:
            cleanup(demo, keep_files=failed)
    return 130 if interrupted else 1 if failed else 0


def cleanup(demo: Demo, keep_files: bool) -> None:
    with step("cleaning up: machines, reconciler, shim, git daemon"):
        demo.procs.stop("reconciler")  # first, or it would recreate what we remove
        asyncio.run(demo.remove_machines())
        demo.procs.stop_all()
        remove_folder(demo.work, keep_files)


def clean_kept(work: Path) -> int:
    """`--clean DIR`: end what `--keep` left running in DIR, then remove DIR."""
    if not (work / "logs" / CHILDREN).is_file():
        print(f"error: {work} is not the folder of a kept demo", file=sys.stderr)
        return 2
    demo = Demo(work)
    with step(f"cleaning up the demo kept in {work}"):
        stop_recorded(demo.procs.logs, "reconciler")
        asyncio.run(demo.remove_machines())
        stop_recorded(demo.procs.logs)
        remove_folder(work, keep_files=False)
    return 0


def remove_folder(work: Path, keep_files: bool) -> None:
    mounted = mounts_under(work)
    if mounted:  # never rmtree through a mount: it could reach files outside the demo
        say(f"    still mounted under {work}: {', '.join(mounted)}")
    if keep_files or mounted:
        say(f"    kept {work} for its logs")
    else:
        shutil.rmtree(work, ignore_errors=True)


def mounts_under(folder: Path) -> list[str]:
    """Mount points at or below `folder` (mountinfo's 5th field, octal escapes decoded)."""
    root = folder.resolve()
    points = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        point = line.split()[4].encode().decode("unicode_escape")
        if Path(point).is_relative_to(root):
            points.append(point)
    return points


def say_kept(demo: Demo) -> None:
    say("==> kept running (--keep):")
    for name, proc in demo.procs.children:
        say(f"    {name}: pid {proc.pid} (log {demo.procs.logs / name}.log)")
    say(f"    bitbuilder get tenants --state-dir {demo.state.root}")
    say(f"    change a tenant: cd {demo.work / 'src' / CHANGED} && edit, git commit, git push")
    say(f"    end it all: bitbuilder demo --clean {demo.work}")


def register(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = commands.add_parser(
        "demo",
        help="run the whole story on this host (root): tenants, an update, a rollback",
        description="Build a base image, serve a fleet repo and two tenant repos on loopback, "
        "run the host shim and the standalone reconciler, roll out a commit and roll it back.",
    )
    parser.add_argument("--keep", action="store_true", help="leave everything running")
    parser.add_argument("--workdir", type=Path, help="work folder (default: a new one in /var/tmp)")
    parser.add_argument(
        "--clean", type=Path, metavar="DIR", help="end a --keep demo: machines, processes, DIR"
    )
    parser.set_defaults(
        handler=lambda args: (
            clean_kept(args.clean) if args.clean else run_demo(args.workdir, args.keep)
        )
    )
