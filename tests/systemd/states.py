"""Persisted tenant states as the shim writes them, for the generator to read."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

from bitbuilder.hostshim.api import MachineSpec
from bitbuilder.hostshim.config import ShimConfig
from bitbuilder.hostshim.state.store import (
    AppliedState,
    Intent,
    StateStore,
    TenantState,
    machine_hash,
    spec_hash,
)

COMMIT = "a" * 40


def save(state_dir: Path, name: str, *, running: bool | None, intent: Intent | None = None) -> None:
    spec = MachineSpec(name=name, image="busybox")
    state = TenantState.new(spec)
    state.intent = intent
    if running is not None:
        state.applied = AppliedState(
            spec=spec,
            spec_hash=spec_hash(spec),
            machine_hash=machine_hash(spec),
            commit=COMMIT,
            ref="main",
            running=running,
            at=datetime.now(UTC),
        )
    StateStore(ShimConfig(state_dir=state_dir)).save(state)


def wanted(normal: Path) -> list[str]:
    """The setup-tenant@ instances a generator run pulled into multi-user.target."""
    wants = normal / "multi-user.target.wants"
    return sorted(p.name for p in wants.iterdir()) if wants.exists() else []
