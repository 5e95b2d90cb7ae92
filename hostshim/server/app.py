"""HTTP/JSON on a unix socket: peer-credential check, strict input handling, errors as ApiError.

Every client input ends in a 2xx or a 4xx whose ApiError body names the problem; a 5xx means a
bug in the shim (logged with its traceback). Blocking work (git, machines) runs in worker
threads, so /healthz answers while a tenant is being reconciled.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import logging
import os
import re
import socket
import stat
import struct
from collections.abc import Awaitable, Callable, Collection, Coroutine
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

from aiohttp import web
from pydantic import BaseModel, ValidationError

from bitbuilder.hostshim.api import (
    API_VERSION,
    DNS1123_LABEL_PATTERN,
    ApiError,
    HostLayersList,
    HostLayersSpec,
    ImageList,
    ImageSpec,
    MachinePhase,
    MachineSpec,
)
from bitbuilder.hostshim.config import ShimConfig
from bitbuilder.hostshim.errors import NotFound, ShimError, host_error_from
from bitbuilder.hostshim.host.layers import HostLayers
from bitbuilder.hostshim.machine.manager import MachineManager
from bitbuilder.hostshim.policy import host_port_refusal
from bitbuilder.hostshim.server.openapi import openapi_document

log = logging.getLogger(__name__)

M = TypeVar("M", bound=BaseModel)
T = TypeVar("T")
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

_LABEL = re.compile(DNS1123_LABEL_PATTERN)
_MAX_ERRORS_SHOWN = 5
MAX_WAIT = 60.0  # seconds a machine read may wait for a change (?wait=)
MAX_PAGE = 10_000  # machines in one list page (?limit=)


class ApiProblem(Exception):
    """A request the shim refuses: becomes an ApiError body with `status`."""

    def __init__(self, status: int, error: str, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.status, self.error, self.message, self.field = status, error, message, field


def _reply(status: int, error: str, message: str, field: str | None = None) -> web.Response:
    body = ApiError(error=error, message=message, field=field).wire()
    return web.json_response(body, status=status)


def _camel(reason: str) -> str:
    return "".join(word.capitalize() for word in re.split(r"[^A-Za-z0-9]+", reason) if word)


# --- middlewares ---------------------------------------------------------------------------


@web.middleware
async def _errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Map every failure to an ApiError body; unexpected ones to 500 with a logged traceback."""
    try:
        return await handler(request)
    except ApiProblem as exc:
        return _reply(exc.status, exc.error, exc.message, exc.field)
    except ShimError as exc:
        if exc.status >= 500:
            log.error("%s %s: %s", request.method, request.path, exc.message)
        return _reply(exc.status, exc.reason, exc.message)
    except web.HTTPException as exc:
        if exc.status == 413:
            return _reply(
                413,
                "PayloadTooLarge",
                f"request body is larger than {request.app[_STATE].config.max_body_bytes} bytes",
            )
        reply = _reply(
            exc.status, _camel(exc.reason), f"{exc.reason}: {request.method} {request.path}"
        )
        if "Allow" in exc.headers:  # 405 says which methods the route takes
            reply.headers["Allow"] = exc.headers["Allow"]
        return reply
    except Exception as exc:
        # A full or read-only disk is the host's condition, not a bug: say what to change.
        host = host_error_from(exc, f"{request.method} {request.path}")
        if host is not None:
            log.error("%s", host.message)
            return _reply(host.status, host.reason, host.message)
        log.exception("unexpected error serving %s %s", request.method, request.path)
        return _reply(500, "InternalError", "the shim failed unexpectedly; see its log")


def peer_credentials(request: web.Request) -> tuple[int, int, int] | None:
    """(pid, uid, gid) of the process at the other end of the unix socket."""
    sock = request.transport.get_extra_info("socket") if request.transport else None
    if sock is None or sock.family != socket.AF_UNIX:
        return None
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, uid, gid = struct.unpack("3i", raw)
    return pid, uid, gid


@web.middleware
async def _peer_check(request: web.Request, handler: Handler) -> web.StreamResponse:
    config = request.app[_STATE].config
    creds = peer_credentials(request)
    if creds is None:
        raise ApiProblem(
            403, "Forbidden", "only unix-socket peers with known credentials are served"
        )
    _, uid, gid = creds
    if uid not in config.allowed_uids and gid not in config.allowed_gids:
        raise ApiProblem(403, "Forbidden", f"uid {uid} / gid {gid} may not use this socket")
    return await handler(request)


# --- request parsing -----------------------------------------------------------------------


def _reject_constant(name: str) -> object:
    raise ValueError(f"{name} is not valid JSON")


async def _json_body(request: web.Request) -> bytes:
    """The raw body, once it is known to be one JSON document of acceptable size and type."""
    if request.content_type != "application/json":
        raise ApiProblem(
            415,
            "UnsupportedMediaType",
            f"the body must be application/json, not {request.content_type!r}",
        )
    limit = request.app[_STATE].config.max_body_bytes
    if request.content_length is not None and request.content_length > limit:
        raise ApiProblem(413, "PayloadTooLarge", f"request body is larger than {limit} bytes")
    raw = await request.read()
    try:
        json.loads(raw.decode("utf-8"), parse_constant=_reject_constant)
    except (ValueError, RecursionError) as exc:
        raise ApiProblem(
            400, "InvalidJSON", f"the body is not valid JSON: {str(exc)[:200]}"
        ) from None
    return raw


def _validate(model: type[M], raw: bytes) -> M:
    """Strict validation: JSON types must be right ("yes" is not a boolean, "5" not a number)."""
    try:
        return model.model_validate_json(raw, strict=True)
    except ValidationError as exc:
        errors = exc.errors(include_input=False, include_url=False)
        parts = []
        for error in errors[:_MAX_ERRORS_SHOWN]:
            loc = ".".join(str(p) for p in error["loc"])
            parts.append(f"{loc}: {error['msg']}" if loc else error["msg"])
        more = (
            f" (and {len(errors) - _MAX_ERRORS_SHOWN} more)"
            if len(errors) > _MAX_ERRORS_SHOWN
            else ""
        )
        first = ".".join(str(p) for p in errors[0]["loc"]) or None
        raise ApiProblem(422, "ValidationFailed", "; ".join(parts) + more, first) from None


def _name(request: web.Request) -> str:
    name = request.match_info["name"]
    if len(name) > 63 or not _LABEL.fullmatch(name):
        raise ApiProblem(
            422,
            "ValidationFailed",
            "name: must be a DNS-1123 label (a-z, 0-9, '-', at most 63)",
            "name",
        )
    return name


def _query(request: web.Request, allowed: Collection[str] = ()) -> dict[str, str]:
    unknown = sorted(set(request.query) - set(allowed))
    if unknown:
        raise ApiProblem(
            422, "ValidationFailed", f"unknown query parameter {unknown[0]!r}", unknown[0]
        )
    return {k: request.query[k] for k in allowed if k in request.query}


def _wait_param(params: dict[str, str]) -> float:
    text = params.get("wait", "0")
    try:
        seconds = float(text)
    except ValueError:
        seconds = -1.0
    if not 0 <= seconds <= MAX_WAIT:
        raise ApiProblem(
            422, "ValidationFailed", f"wait: seconds from 0 to {MAX_WAIT:g}, not {text!r}", "wait"
        )
    return seconds


def _limit_param(params: dict[str, str]) -> int | None:
    text = params.get("limit")
    if text is None:
        return None
    if not text.isdigit() or not 1 <= int(text) <= MAX_PAGE:
        raise ApiProblem(
            422, "ValidationFailed", f"limit: a number from 1 to {MAX_PAGE}, not {text!r}", "limit"
        )
    return int(text)


def _continue_param(params: dict[str, str]) -> str | None:
    """The `continue` of the page before: the machine name the next page starts after."""
    text = params.get("continue")
    if text is not None and (len(text) > 63 or not _LABEL.fullmatch(text)):
        raise ApiProblem(
            422,
            "ValidationFailed",
            "continue: give the continue value of the page before",
            "continue",
        )
    return text


def _json_reply(body: bytes) -> web.Response:
    return web.Response(body=body, content_type="application/json")


def _phases_param(params: dict[str, str]) -> set[MachinePhase]:
    phases = set()
    for text in filter(None, params.get("unlessPhase", "").split(",")):
        try:
            phases.add(MachinePhase(text))
        except ValueError:
            known = ", ".join(MachinePhase)
            raise ApiProblem(
                422, "ValidationFailed", f"unlessPhase: {text!r} is none of {known}", "unlessPhase"
            ) from None
    return phases


async def _first(*waits: Coroutine[Any, Any, object], timeout: float) -> None:
    """Until one of `waits` is done or `timeout` passes; the others are cancelled."""
    tasks = [asyncio.ensure_future(w) for w in waits]
    try:
        await asyncio.wait(tasks, timeout=max(timeout, 0.0), return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in tasks:
            task.cancel()


def _bool_param(params: dict[str, str], key: str) -> bool | None:
    value = params.get(key)
    if value is None:
        return None
    if value not in ("true", "false"):
        raise ApiProblem(422, "ValidationFailed", f"{key}: must be true or false", key)
    return value == "true"


# --- the application ------------------------------------------------------------------------


class ShimApp:
    """Routes and the worker pools behind them."""

    def __init__(
        self,
        manager: MachineManager,
        config: ShimConfig,
        drift_interval: float | None,
        host: HostLayers | None = None,
    ) -> None:
        self.manager = manager
        self.host = host or HostLayers(config)
        self.config = config
        self.drift_interval = drift_interval
        # Long work (git, starting machines) and quick reads get separate threads, so a burst
        # of PUTs never delays a status read.
        self._work = ThreadPoolExecutor(max_workers=16, thread_name_prefix="shim-work")
        self._reads = ThreadPoolExecutor(max_workers=4, thread_name_prefix="shim-read")
        self._tasks: list[asyncio.Task[None]] = []
        self.resumed = False
        # Set (and dropped) when a machine's status changes: what waiting reads wait on.
        self._changed: dict[str, asyncio.Event] = {}
        self._closing = asyncio.Event()  # the server shuts down: waiting reads answer now

    async def work(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._work, partial(fn, *args))

    async def read(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._reads, partial(fn, *args))

    def build(self) -> web.Application:
        app = web.Application(
            middlewares=[_errors, _peer_check], client_max_size=self.config.max_body_bytes
        )
        app[_STATE] = self
        v = f"/{API_VERSION}"
        app.router.add_get("/healthz", self.healthz)
        app.router.add_get("/openapi.json", self.openapi)
        app.router.add_get(f"{v}/machines", self.list_machines)
        app.router.add_get(f"{v}/machines/{{name}}", self.get_machine)
        app.router.add_put(f"{v}/machines/{{name}}", self.put_machine)
        app.router.add_delete(f"{v}/machines/{{name}}", self.delete_machine)
        app.router.add_post(f"{v}/machines/{{name}}/restart", self.restart_machine)
        app.router.add_get(f"{v}/images", self.list_images)
        app.router.add_get(f"{v}/images/{{name}}", self.get_image)
        app.router.add_put(f"{v}/images/{{name}}", self.put_image)
        app.router.add_get(f"{v}/host/layers", self.list_host_layers)
        app.router.add_get(f"{v}/host/layers/{{name}}", self.get_host_layers)
        app.router.add_put(f"{v}/host/layers/{{name}}", self.put_host_layers)
        app.router.add_delete(f"{v}/host/layers/{{name}}", self.delete_host_layers)
        app.router.add_delete(f"{v}/images/{{name}}", self.delete_image)
        app.on_startup.append(self._start_background)
        app.on_shutdown.append(self._shutdown)
        app.on_cleanup.append(self._stop_background)
        return app

    # --- background: resume half-done work, then check for drift -----------------------

    async def _start_background(self, app: web.Application) -> None:
        loop = asyncio.get_running_loop()

        def changed(name: str) -> None:  # called from the worker threads
            with contextlib.suppress(RuntimeError):  # the loop closed: nobody waits any more
                loop.call_soon_threadsafe(self._wake, name)

        self.manager.on_change = changed
        self._tasks.append(asyncio.create_task(self._background()))

    async def _shutdown(self, app: web.Application) -> None:
        self._closing.set()

    def _wake(self, name: str) -> None:
        event = self._changed.pop(name, None)
        if event is not None:
            event.set()

    async def _background(self) -> None:
        try:
            await self.work(self.manager.resume)
        except Exception:
            log.exception("resuming tenants failed")
        self.resumed = True
        while self.drift_interval is not None:
            await asyncio.sleep(self.drift_interval)
            try:
                await self.work(self.manager.check_drift)
            except Exception:
                log.exception("drift check failed")

    async def _stop_background(self, app: web.Application) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._work.shutdown(wait=False, cancel_futures=True)
        self._reads.shutdown(wait=False, cancel_futures=True)

    # --- handlers ------------------------------------------------------------------------

    async def healthz(self, request: web.Request) -> web.Response:
        _query(request)
        return web.json_response({"status": "ok", "resumed": self.resumed})

    async def openapi(self, request: web.Request) -> web.Response:
        _query(request)
        return web.json_response(openapi_document())

    async def list_machines(self, request: web.Request) -> web.Response:
        """Every machine, or a page of them (`limit`, then `continue` as the reply gave it).
        Each status's JSON is kept from its last change, so the reply is joined, not made."""
        params = _query(request, ("limit", "continue"))
        limit, after = _limit_param(params), _continue_param(params)
        entries, more = await self.read(self.manager.list_page, after, limit)
        tail = b',"continue":' + json.dumps(more).encode() if more is not None else b""
        return _json_reply(b'{"items":[' + b",".join(e.body for e in entries) + b"]" + tail + b"}")

    async def get_machine(self, request: web.Request) -> web.Response:
        """The status; with ?wait=S&unlessPhase=A,B it is pushed: the reply comes once the
        phase is none of those (at once if so already), or after S seconds as it is then (404
        only if the machine is still unknown then). Drivers watch a PUT's progress this way."""
        name = _name(request)
        params = _query(request, ("wait", "unlessPhase"))
        wait, unless = _wait_param(params), _phases_param(params)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait
        while True:
            changed = self._changed.setdefault(name, asyncio.Event())  # before the read: no
            try:  # change between the read and the wait is missed
                entry = await self.read(self.manager.get_cached, name)
            except NotFound:
                if loop.time() >= deadline:
                    raise
            else:
                phase = entry.status.phase
                if phase not in unless or loop.time() >= deadline or self._closing.is_set():
                    return _json_reply(entry.body)
            if request.transport is None or request.transport.is_closing():
                raise web.HTTPNoContent()  # the caller has gone (its PUT answered first)
            # Woken by the change, by shutdown, or each second to see if the caller is still there.
            await _first(
                changed.wait(), self._closing.wait(), timeout=min(deadline - loop.time(), 1.0)
            )

    async def put_machine(self, request: web.Request) -> web.Response:
        name = _name(request)
        _query(request)
        spec = _validate(MachineSpec, await _json_body(request))
        if spec.name != name:
            raise ApiProblem(
                422,
                "ValidationFailed",
                f"name: the body names {spec.name!r}, the path {name!r}",
                "name",
            )
        refused = host_port_refusal(spec, self.config)
        if refused is not None:
            raise ApiProblem(422, "HostPortNotAllowed", *refused)
        return web.json_response((await self.work(self.manager.apply, spec)).wire())

    async def delete_machine(self, request: web.Request) -> web.Response:
        name = _name(request)
        keep = _bool_param(_query(request, ("keepData",)), "keepData")
        await self.work(self.manager.delete, name, keep)
        return web.json_response({"deleted": name})

    async def restart_machine(self, request: web.Request) -> web.Response:
        name = _name(request)
        _query(request)
        return web.json_response((await self.work(self.manager.restart, name)).wire())

    async def list_images(self, request: web.Request) -> web.Response:
        _query(request)
        items = await self.read(self.manager.list_images)
        return web.json_response(ImageList(items=items).wire())

    async def get_image(self, request: web.Request) -> web.Response:
        name = _name(request)
        _query(request)
        return web.json_response((await self.read(self.manager.get_image, name)).wire())

    async def put_image(self, request: web.Request) -> web.Response:
        name = _name(request)
        _query(request)
        spec = _validate(ImageSpec, await _json_body(request))
        return web.json_response((await self.work(self.manager.put_image, name, spec)).wire())

    async def list_host_layers(self, request: web.Request) -> web.Response:
        _query(request)
        items = await self.read(self.host.list_all)
        return web.json_response(HostLayersList(items=items).wire())

    async def get_host_layers(self, request: web.Request) -> web.Response:
        name = _name(request)
        _query(request)
        return web.json_response((await self.read(self.host.get, name)).wire())

    async def put_host_layers(self, request: web.Request) -> web.Response:
        name = _name(request)
        _query(request)
        spec = _validate(HostLayersSpec, await _json_body(request))
        if spec.name != name:
            raise ApiProblem(
                422,
                "ValidationFailed",
                f"name: the body names {spec.name!r}, the path {name!r}",
                "name",
            )
        return web.json_response((await self.work(self.host.apply, spec)).wire())

    async def delete_host_layers(self, request: web.Request) -> web.Response:
        name = _name(request)
        _query(request)
        await self.work(self.host.delete, name)
        return web.json_response({"deleted": name})

    async def delete_image(self, request: web.Request) -> web.Response:
        name = _name(request)
        _query(request)
        await self.work(self.manager.delete_image, name)
        return web.json_response({"deleted": name})


_STATE = web.AppKey("shim", ShimApp)


# --- the socket ------------------------------------------------------------------------------


def _clear_stale_socket(path: Path) -> None:
    """Remove a socket left by a dead shim; refuse anything else (a file, a live shim)."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise RuntimeError(f"{path} exists and is not a socket; refusing to replace it")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(1.0)
    try:
        probe.connect(str(path))
    except OSError as exc:
        if exc.errno not in (errno.ECONNREFUSED, errno.ENOENT):
            raise
    else:
        raise RuntimeError(f"another process is serving on {path}")
    finally:
        probe.close()
    path.unlink(missing_ok=True)


def bind_socket(config: ShimConfig) -> socket.socket:
    """The listening socket: mode 0660 (group = the first allowed gid) set before listen()."""
    path = config.socket_path
    path.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
    _clear_stale_socket(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(str(path))
        if config.allowed_gids:
            os.chown(path, -1, min(config.allowed_gids))
        os.chmod(path, 0o660)
        sock.listen(128)
    except BaseException:
        sock.close()
        raise
    return sock


async def serve(
    manager: MachineManager,
    config: ShimConfig,
    stop: asyncio.Event,
    *,
    drift_interval: float | None = 30.0,
    ready: Callable[[], None] | None = None,
    activated: socket.socket | None = None,
) -> None:
    """Serve until `stop` is set. Machines keep running after: they do not belong to the shim.

    `activated` is a listening socket systemd passed (socket activation): used as it is, and
    left in place at exit, since systemd owns it."""
    app = ShimApp(manager, config, drift_interval).build()
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    sock = activated or bind_socket(config)
    try:
        await web.SockSite(runner, sock).start()
        log.info("serving on %s", sock.getsockname() or config.socket_path)
        if ready is not None:
            ready()
        await stop.wait()
    finally:
        await runner.cleanup()
        sock.close()
        if activated is None:
            with contextlib.suppress(FileNotFoundError):
                config.socket_path.unlink()
