"""An in-memory host shim on a unix socket: the real HTTP API, no machines.

For fast tests of the operator side (client, reconcile core, drivers). A test sets what the
"remote" holds (`heads`) and what goes wrong (`source_errors`, `fail_with`); every PUT then
answers like the real shim would.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from aiohttp import web

from bitbuilder.hostshim.api import (
    ApiError,
    AppliedRevision,
    ErrorInfo,
    HostLayersList,
    HostLayersPhase,
    HostLayersSpec,
    HostLayersStatus,
    ImageList,
    ImageSpec,
    ImageStatus,
    MachineList,
    MachinePhase,
    MachineSpec,
    MachineStatus,
)


def image_status(name: str, spec: ImageSpec) -> ImageStatus:
    """What a fake image import reports: the spec's digest and source, one byte, now."""
    return ImageStatus(
        name=name,
        sha256=spec.sha256,
        size_bytes=1,
        imported_at=datetime.now(UTC),
        source=spec.url or spec.path or "",
    )


@dataclass
class FakeShim:
    socket: Path
    heads: dict[str, str] = field(default_factory=dict)  # tenant -> commit the remote has
    source_errors: dict[str, ErrorInfo] = field(default_factory=dict)
    fail_with: tuple[int, ApiError] | None = None
    specs: dict[str, MachineSpec] = field(default_factory=dict)
    machines: dict[str, MachineStatus] = field(default_factory=dict)
    images: dict[str, ImageStatus] = field(default_factory=dict)
    requests: list[tuple[str, str]] = field(default_factory=list)
    apply_seconds: float = 0.0  # how long a PUT "works" (GET shows Updating/Pending meanwhile)
    bodies: list[dict[str, object]] = field(default_factory=list)
    host_specs: dict[str, HostLayersSpec] = field(default_factory=dict)
    host_layers: dict[str, HostLayersStatus] = field(default_factory=dict)

    def host_status_for(self, spec: HostLayersSpec) -> HostLayersStatus:
        """Like the shim: the remote's head merged unless it is refused (source_errors)."""
        old = self.host_layers.get(spec.name)
        head, error = self.heads.get(spec.name), self.source_errors.get(spec.name)
        applied = old.applied_revision if old else None
        previous = old.previous_revision if old else None
        history = list(old.history) if old else []
        if head is not None and error is None and head != applied:
            previous, applied = applied, head
            history.insert(0, AppliedRevision(revision=head, applied_at=datetime.now(UTC)))
        phase = HostLayersPhase.applied if applied else HostLayersPhase.failed
        return HostLayersStatus(
            name=spec.name,
            phase=phase if applied or error else HostLayersPhase.pending,
            spec_hash=hashlib.sha256(json.dumps(spec.wire()).encode()).hexdigest(),
            source_revision=f"{spec.source.ref.describe()}@sha1:{head}" if head else None,
            applied_revision=applied,
            previous_revision=previous,
            history=history,
            source_error=error,
        )

    def status_for(self, spec: MachineSpec) -> MachineStatus:
        now = datetime.now(UTC)
        old = self.machines.get(spec.name)
        head = self.heads.get(spec.name)
        error = self.source_errors.get(spec.name)
        applied = old.applied_revision if old else None
        history = list(old.history) if old else []
        if spec.source is not None and head is not None and error is None and head != applied:
            applied = head
            history.insert(0, AppliedRevision(revision=head, applied_at=now))
        ref = spec.source.ref.describe() if spec.source else ""
        runs = not spec.suspend and (applied is not None or spec.source is None)
        phase = MachinePhase.running if runs else MachinePhase.stopped
        if spec.source is not None and applied is None and not spec.suspend:
            phase = MachinePhase.failed
        return MachineStatus(
            name=spec.name,
            phase=phase,
            runtime=spec.runtime,
            spec_hash=hashlib.sha256(json.dumps(spec.wire()).encode()).hexdigest(),
            source_revision=f"{ref}@sha1:{head}" if head and spec.source else None,
            applied_revision=applied,
            history=history,
            leader_pid=4242 if runs else None,
            address="10.99.0.2" if runs else None,
            started_at=(old.started_at if old and old.started_at else now) if runs else None,
            source_error=error,
        )


def _json(
    model: MachineStatus
    | MachineList
    | ImageStatus
    | ImageList
    | HostLayersStatus
    | HostLayersList
    | ApiError,
    code: int = 200,
) -> web.Response:
    return web.json_response(model.wire(), status=code)


def _app(fake: FakeShim) -> web.Application:
    async def put_machine(request: web.Request) -> web.Response:
        fake.requests.append(("PUT", request.match_info["name"]))
        if fake.fail_with is not None:
            return _json(fake.fail_with[1], fake.fail_with[0])
        body = await request.json()
        fake.bodies.append(body)
        spec = MachineSpec.model_validate(body)
        fake.specs[spec.name] = spec
        if fake.apply_seconds:
            old = fake.machines.get(spec.name) or fake.status_for(spec)
            busy = MachinePhase.updating if old.applied_revision else MachinePhase.pending
            fake.machines[spec.name] = old.model_copy(update={"phase": busy})
            await asyncio.sleep(fake.apply_seconds)
        fake.machines[spec.name] = fake.status_for(spec)
        return _json(fake.machines[spec.name])

    async def get_machine(request: web.Request) -> web.Response:
        name = request.match_info["name"]
        fake.requests.append(("GET", name))
        # ?wait=S&unlessPhase=A,B as the shim answers it (by polling: a fake can afford it)
        unless = set(filter(None, request.query.get("unlessPhase", "").split(",")))
        deadline = time.monotonic() + float(request.query.get("wait", "0"))
        while time.monotonic() < deadline and (
            name not in fake.machines or fake.machines[name].phase in unless
        ):
            if request.transport is None or request.transport.is_closing():
                return web.Response(status=204)  # the caller has gone
            await asyncio.sleep(0.01)
        if name not in fake.machines:
            return _json(ApiError(error="NotFound", message=f"no machine {name}"), 404)
        return _json(fake.machines[name])

    async def delete_machine(request: web.Request) -> web.Response:
        name = request.match_info["name"]
        fake.requests.append(("DELETE", name))
        if fake.machines.pop(name, None) is None:
            return _json(ApiError(error="NotFound", message=f"no machine {name}"), 404)
        fake.specs.pop(name, None)
        return web.Response(status=204)

    async def list_machines(request: web.Request) -> web.Response:
        return _json(MachineList(items=list(fake.machines.values())))

    async def put_image(request: web.Request) -> web.Response:
        name = request.match_info["name"]
        fake.requests.append(("PUT-IMAGE", name))
        spec = ImageSpec.model_validate(await request.json())
        fake.images[name] = image_status(name, spec)
        return _json(fake.images[name])

    async def list_images(request: web.Request) -> web.Response:
        return _json(ImageList(items=list(fake.images.values())))

    async def healthz(request: web.Request) -> web.Response:
        return web.Response(text="ok")

    async def put_host_layers(request: web.Request) -> web.Response:
        fake.requests.append(("PUT-HOST", request.match_info["name"]))
        spec = HostLayersSpec.model_validate(await request.json())
        fake.host_specs[spec.name] = spec
        fake.host_layers[spec.name] = fake.host_status_for(spec)
        return _json(fake.host_layers[spec.name])

    async def list_host_layers(request: web.Request) -> web.Response:
        return _json(HostLayersList(items=list(fake.host_layers.values())))

    async def delete_host_layers(request: web.Request) -> web.Response:
        name = request.match_info["name"]
        fake.requests.append(("DELETE-HOST", name))
        if fake.host_layers.pop(name, None) is None:
            return _json(ApiError(error="NotFound", message=f"no host layers {name}"), 404)
        fake.host_specs.pop(name, None)
        return web.json_response({"deleted": name})

    app = web.Application()
    app.router.add_put("/v1/machines/{name}", put_machine)
    app.router.add_get("/v1/machines/{name}", get_machine)
    app.router.add_delete("/v1/machines/{name}", delete_machine)
    app.router.add_get("/v1/machines", list_machines)
    app.router.add_put("/v1/images/{name}", put_image)
    app.router.add_get("/v1/images", list_images)
    app.router.add_get("/healthz", healthz)
    app.router.add_put("/v1/host/layers/{name}", put_host_layers)
    app.router.add_get("/v1/host/layers", list_host_layers)
    app.router.add_delete("/v1/host/layers/{name}", delete_host_layers)
    return app


@asynccontextmanager
async def running_fake_shim(socket: Path) -> AsyncIterator[FakeShim]:
    fake = FakeShim(socket=socket)
    runner = web.AppRunner(_app(fake))
    await runner.setup()
    await web.UnixSite(runner, str(socket)).start()
    try:
        yield fake
    finally:
        await runner.cleanup()
