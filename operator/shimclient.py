"""Async client for the host shim's HTTP API on its unix socket, typed with hostshim/api.py."""

from __future__ import annotations

import json
from collections.abc import Collection
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

import aiohttp
from pydantic import BaseModel, ValidationError

from bitbuilder.hostshim.api import (
    API_VERSION,
    ApiError,
    HostLayersList,
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

DEFAULT_SOCKET = Path("/run/bitbuilder/hostshim.sock")
LIST_PAGE = 100  # machines per list request
M = TypeVar("M", bound=BaseModel)


class ShimError(Exception):
    """Any failure talking to the shim."""


class ShimUnavailable(ShimError):
    """The socket is missing, refused the connection, or the call timed out."""


class ShimApiError(ShimError):
    """The shim answered 4xx/5xx with an ApiError body."""

    def __init__(self, status: int, error: ApiError) -> None:
        super().__init__(f"{error.error}: {error.message}")
        self.status = status
        self.error = error


class ShimClient:
    """One aiohttp session over the socket. `apply` may take long (fetch + start): it has its
    own, larger timeout."""

    def __init__(
        self,
        socket: Path = DEFAULT_SOCKET,
        timeout: float = 30.0,
        apply_timeout: float = 600.0,
    ) -> None:
        self.socket = socket
        self.timeout = timeout
        self.apply_timeout = apply_timeout
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> ShimClient:
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    def _http(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            connector = aiohttp.UnixConnector(path=str(self.socket))
            self._session = aiohttp.ClientSession(connector=connector)
        return self._session

    async def _call(
        self,
        method: str,
        path: str,
        body: dict[str, Any] | None = None,
        timeout: float | None = None,
        params: dict[str, str] | None = None,
    ) -> tuple[int, Any]:
        url = f"http://hostshim/{API_VERSION}{path}"
        try:
            async with self._http().request(
                method,
                url,
                json=body,
                params=params,
                timeout=aiohttp.ClientTimeout(total=timeout or self.timeout),
            ) as response:
                raw = await response.read()
                payload = json.loads(raw) if raw else None
                if response.status >= 400:
                    raise ShimApiError(response.status, _api_error(response.status, payload))
                return response.status, payload
        except (aiohttp.ClientConnectionError, FileNotFoundError, ConnectionError) as exc:
            raise ShimUnavailable(f"host shim at {self.socket} unreachable: {exc}") from exc
        except TimeoutError as exc:
            raise ShimUnavailable(f"host shim at {self.socket}: {method} {path} timed out") from exc
        except ValueError as exc:  # not JSON: not the shim this client knows
            raise ShimError(f"{method} {path}: the shim's answer is not JSON: {exc}") from exc

    async def _typed(self, model: type[M], method: str, path: str, **kw: Any) -> M:
        _, payload = await self._call(method, path, **kw)
        try:
            return model.model_validate(payload)
        except ValidationError as exc:
            raise ShimError(f"{method} {path}: unexpected answer from the shim: {exc}") from exc

    async def apply(self, spec: MachineSpec) -> MachineStatus:
        """PUT the desired state; the shim reconciles synchronously and answers the status."""
        return await self._typed(
            MachineStatus,
            "PUT",
            f"/machines/{spec.name}",
            body=spec.wire_secret(),  # secrets revealed only on their way into the socket
            timeout=self.apply_timeout,
        )

    async def get(self, name: str) -> MachineStatus | None:
        try:
            return await self._typed(MachineStatus, "GET", f"/machines/{name}")
        except ShimApiError as exc:
            if exc.status == 404:
                return None
            raise

    async def watch(
        self, name: str, unless: Collection[MachinePhase], wait: float
    ) -> MachineStatus | None:
        """The status once its phase is none of `unless` (pushed by the shim at the change),
        or as it is after `wait` seconds; None if the machine is unknown then."""
        params = {"wait": f"{wait:g}", "unlessPhase": ",".join(sorted(unless))}
        try:
            return await self._typed(
                MachineStatus,
                "GET",
                f"/machines/{name}",
                params=params,
                timeout=wait + self.timeout,
            )
        except ShimApiError as exc:
            if exc.status == 404:
                return None
            raise

    async def machines(self, page: int = LIST_PAGE) -> list[MachineStatus]:
        """Every machine, asked for `page` at a time (each reply stays small at any count)."""
        machines: list[MachineStatus] = []
        after = None
        while True:
            listed = await self.machines_page(page, after)
            machines += listed.items
            if listed.continue_ is None:
                return machines
            after = listed.continue_

    async def machines_page(self, limit: int, after: str | None = None) -> MachineList:
        """At most `limit` machines named after `after`; its continue_ starts the next page."""
        params = {"limit": str(limit)} | ({"continue": after} if after is not None else {})
        return await self._typed(MachineList, "GET", "/machines", params=params)

    async def delete(self, name: str, keep_data: bool = False) -> bool:
        """Stop and remove the machine; False if it did not exist."""
        params = {"keepData": "true"} if keep_data else None
        try:
            await self._call(
                "DELETE", f"/machines/{name}", params=params, timeout=self.apply_timeout
            )
        except ShimApiError as exc:
            if exc.status == 404:
                return False
            raise
        return True

    async def restart(self, name: str) -> MachineStatus:
        return await self._typed(
            MachineStatus, "POST", f"/machines/{name}/restart", timeout=self.apply_timeout
        )

    async def put_image(self, name: str, spec: ImageSpec) -> ImageStatus:
        return await self._typed(
            ImageStatus, "PUT", f"/images/{name}", body=spec.wire(), timeout=self.apply_timeout
        )

    async def images(self) -> list[ImageStatus]:
        return (await self._typed(ImageList, "GET", "/images")).items

    async def apply_host_layers(self, spec: HostLayersSpec) -> HostLayersStatus:
        """PUT a host profile's layers; the shim fetches, verifies and merges before replying."""
        return await self._typed(
            HostLayersStatus,
            "PUT",
            f"/host/layers/{spec.name}",
            body=spec.wire_secret(),  # secrets revealed only on their way into the socket
            timeout=self.apply_timeout,
        )

    async def host_layers(self) -> list[HostLayersStatus]:
        return (await self._typed(HostLayersList, "GET", "/host/layers")).items

    async def delete_host_layers(self, name: str) -> bool:
        """Unmerge and remove a profile's layers; False if the shim had none of that name."""
        try:
            await self._call("DELETE", f"/host/layers/{name}", timeout=self.apply_timeout)
        except ShimApiError as exc:
            if exc.status == 404:
                return False
            raise
        return True

    async def healthy(self) -> bool:
        try:
            async with self._http().get(
                "http://hostshim/healthz", timeout=aiohttp.ClientTimeout(total=self.timeout)
            ) as response:
                return response.status == 200
        except (TimeoutError, aiohttp.ClientError, OSError):
            return False


def _api_error(status: int, payload: Any) -> ApiError:
    try:
        return ApiError.model_validate(payload)
    except ValidationError:
        return ApiError(error=f"HTTP{status}", message=str(payload)[:500])
