"""Standalone mode's own state: one small JSON file per tenant it manages, plus the fleet's.

A tenant's file exists from just before its machine is first created until the machine is
removed: the set of files is the set of machines this reconciler owns (it never removes a
machine it did not create). The file also holds what `bitbuilder get tenants` prints (the last
computed status) and the tenant's generation, which standalone mode counts itself: it goes up
whenever the manifest's spec changes, like metadata.generation in a cluster.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
from datetime import UTC, datetime
from pathlib import Path
from typing import TextIO

from pydantic import BaseModel, Field

from bitbuilder.operator.api import Tenant, TenantStatus

DEFAULT_STATE_DIR = Path("/var/lib/bitbuilder/standalone")


class StateBusy(OSError):
    pass


class TenantRecord(BaseModel):
    name: str
    manifest: dict[str, object]
    spec_hash: str
    generation: int = 1
    created: datetime
    status: TenantStatus | None = None

    def tenant(self) -> Tenant:
        """The manifest as last seen, with our generation and status."""
        tenant = Tenant.from_object(self.manifest)
        meta = tenant.metadata.model_copy(update={"generation": self.generation})
        return tenant.model_copy(update={"metadata": meta, "status": self.status})


class FleetRecord(BaseModel):
    source: str
    revision: str | None = None
    checked: datetime | None = None
    error: str | None = None
    problems: list[str] = Field(default_factory=list)


def spec_hash(tenant: Tenant) -> str:
    body = json.dumps(tenant.spec.wire(), sort_keys=True).encode()
    return hashlib.sha256(body).hexdigest()[:16]


def observe(record: TenantRecord | None, tenant: Tenant, now: datetime) -> TenantRecord:
    """The record for the tenant's current manifest: a new spec is a new generation."""
    digest = spec_hash(tenant)
    manifest = tenant.model_dump(mode="json", by_alias=True, exclude_none=True, exclude={"status"})
    if record is None:
        return TenantRecord(
            name=tenant.metadata.name, manifest=manifest, spec_hash=digest, created=now
        )
    generation = record.generation + (record.spec_hash != digest)
    return record.model_copy(
        update={"manifest": manifest, "spec_hash": digest, "generation": generation}
    )


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


class LocalState:
    def __init__(self, root: Path = DEFAULT_STATE_DIR) -> None:
        self.root = root
        self.tenants_dir = root / "tenants"

    def _path(self, name: str) -> Path:
        return self.tenants_dir / f"{name}.json"

    def load(self, name: str) -> TenantRecord | None:
        try:
            return TenantRecord.model_validate_json(self._path(name).read_text())
        except FileNotFoundError:
            return None

    def save(self, record: TenantRecord) -> None:
        self.tenants_dir.mkdir(parents=True, exist_ok=True)
        _write_atomic(self._path(record.name), record.model_dump_json(indent=1))

    def remove(self, name: str) -> None:
        self._path(name).unlink(missing_ok=True)

    def names(self) -> list[str]:
        """The tenants (machines) this reconciler created and has not removed yet."""
        if not self.tenants_dir.is_dir():
            return []
        return sorted(p.stem for p in self.tenants_dir.glob("*.json"))

    def records(self) -> list[TenantRecord]:
        return [r for r in (self.load(n) for n in self.names()) if r is not None]

    def lock(self) -> TextIO:
        """Hold the state dir for one `bitbuilder run` (two would fight over the machines).
        Kept while the returned file is open; raises StateBusy."""
        self.root.mkdir(parents=True, exist_ok=True)
        handle = (self.root / "run.lock").open("a")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.close()
            raise StateBusy(f"another `bitbuilder run` uses {self.root}") from None
        return handle

    def reconciler_running(self) -> bool:
        """Whether a `bitbuilder run` holds this state dir now (without taking it ourselves)."""
        try:
            handle = (self.root / "run.lock").open("r")
        except FileNotFoundError:
            return False
        with handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                return True
            return False  # closing the handle drops our shared lock

    def save_fleet(self, fleet: FleetRecord) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        _write_atomic(self.root / "fleet.json", fleet.model_dump_json(indent=1))

    def load_fleet(self) -> FleetRecord | None:
        try:
            return FleetRecord.model_validate_json((self.root / "fleet.json").read_text())
        except FileNotFoundError:
            return None


def utcnow() -> datetime:
    return datetime.now(UTC)
