"""A full state disk is the host's condition: the API says so (HostDiskFull, 503, naming the
file system and what to change), never an InternalError, and the shim keeps answering."""

from __future__ import annotations

from pathlib import Path

from tests.helpers.hostfs import fill, mounted_tmpfs
from tests.helpers.needs import needs_root_and
from tests.shim.conftest import machine_spec, serving_fake_shim


@needs_root_and("mount")
def test_full_state_disk_is_reported_as_such(tmp_path: Path) -> None:
    with (
        mounted_tmpfs(tmp_path / "state", size="256k") as state,
        serving_fake_shim(tmp_path) as shim,
    ):
        assert shim.client.put(machine_spec("web")).status == 200
        fill(state)
        reply = shim.client.put(machine_spec("full"))
        assert reply.status == 503, reply.body
        assert reply.body["error"] == "HostDiskFull"
        assert "no space left on the host's disk" in reply.body["message"]
        assert "--state-dir" in reply.body["message"]
        assert shim.client.get("web").status == 200, "the shim keeps answering"
        (state / "filler").unlink()
        assert shim.client.put(machine_spec("full")).status == 200
