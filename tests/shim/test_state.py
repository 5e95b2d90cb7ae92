"""Per-tenant state files: atomic, versioned, private, and never destroyed when unreadable."""

from __future__ import annotations

import json
import os
import stat
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from bitbuilder.hostshim.api import MachineSpec
from bitbuilder.hostshim.state.store import (
    HISTORY_LENGTH,
    StateError,
    StateStore,
    TenantState,
    machine_hash,
    spec_hash,
)
from tests.shim.conftest import machine_spec, shim_config

SECRET = "hunter2-very-secret"


def secret_spec(password: str = SECRET, **overrides: Any) -> MachineSpec:
    source = {
        "url": "https://git.example.com/t.git",
        "ref": {"branch": "main"},
        "credentials": {"username": "bot", "password": password},
    }
    return MachineSpec.model_validate(machine_spec(source=source, **overrides))


@pytest.fixture
def store(tmp_path: Path) -> StateStore:
    return StateStore(shim_config(tmp_path))


def test_round_trip_keeps_credentials_in_a_private_file(store: StateStore) -> None:
    state = TenantState.new(secret_spec())
    store.save(state)
    path = store.paths("web").state_file
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    loaded = store.load("web")
    assert loaded is not None
    creds = loaded.desired.source.credentials if loaded.desired.source else None
    assert creds is not None and creds.password is not None
    assert creds.password.get_secret_value() == SECRET
    assert loaded == state
    assert json.loads(path.read_text())["version"] == 1
    assert store.names() == ["web"]


def test_spec_hash_notices_credentials_without_revealing_them() -> None:
    a, b = secret_spec(), secret_spec(password="other")
    assert spec_hash(a) != spec_hash(b)
    assert spec_hash(a) == spec_hash(secret_spec())
    assert machine_hash(a) == machine_hash(b)  # the machine itself does not change
    assert machine_hash(a) != machine_hash(secret_spec(image="other"))
    assert SECRET not in spec_hash(a)


def test_unknown_version_is_refused_and_the_file_kept(store: StateStore) -> None:
    store.save(TenantState.new(secret_spec()))
    path = store.paths("web").state_file
    doc = json.loads(path.read_text())
    doc["version"] = 2
    path.write_text(json.dumps(doc))
    before = path.read_bytes()
    with pytest.raises(StateError, match="version 2") as info:
        store.load("web")
    assert info.value.reason == "StateVersionUnsupported"
    assert path.read_bytes() == before


@pytest.mark.parametrize("content", [b"{not json", b"[]", b'{"version": 1, "name": "web"}'])
def test_damaged_file_is_an_error_that_names_no_secret(store: StateStore, content: bytes) -> None:
    path = store.paths("web").state_file
    path.parent.mkdir(parents=True)
    path.write_bytes(content)
    with pytest.raises(StateError) as info:
        store.load("web")
    assert path.read_bytes() == content
    assert SECRET not in str(info.value)


def test_damaged_secret_field_is_not_echoed(store: StateStore) -> None:
    store.save(TenantState.new(secret_spec()))
    path = store.paths("web").state_file
    doc = json.loads(path.read_text())
    doc["desired"]["source"]["credentials"]["sshPrivateKey"] = SECRET  # two kinds: invalid
    path.write_text(json.dumps(doc))
    with pytest.raises(StateError, match="damaged") as info:
        store.load("web")
    assert SECRET not in info.value.message


def test_crash_before_rename_leaves_the_old_state(
    store: StateStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = TenantState.new(secret_spec())
    store.save(first)

    def crash(src: object, dst: object) -> None:
        raise OSError("power cut")

    monkeypatch.setattr(os, "replace", crash)
    second = TenantState.new(secret_spec(image="other"))
    with pytest.raises(OSError, match="power cut"):
        store.save(second)
    monkeypatch.undo()
    assert store.load("web") == first
    leftovers = [p.name for p in store.paths("web").root.iterdir()]
    assert leftovers == ["state.json"]


def test_history_is_newest_first_and_bounded() -> None:
    state = TenantState.new(secret_spec())
    now = datetime.now(UTC)
    for i in range(HISTORY_LENGTH + 3):
        state.record_applied(f"{i:040x}", now)
    state.record_applied(f"{HISTORY_LENGTH + 2:040x}", now)  # the same again: no duplicate
    revisions = [h.revision for h in state.history]
    assert len(revisions) == HISTORY_LENGTH
    assert revisions[0] == f"{HISTORY_LENGTH + 2:040x}"
    assert f"{0:040x}" not in revisions


def test_names_skip_folders_that_are_not_tenants(store: StateStore) -> None:
    store.save(TenantState.new(secret_spec()))
    (store.tenants_dir / "Not_A_Label").mkdir()
    (store.tenants_dir / "empty").mkdir()
    assert store.names() == ["web"]
