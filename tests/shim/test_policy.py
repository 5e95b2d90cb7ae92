"""What the host allows a spec: a port forward takes a host port only from the shim's range."""

from __future__ import annotations

import argparse

import pytest

from bitbuilder.hostshim.main import config_from, memory_quantity, parse_args, port_range
from tests.shim.conftest import FakeShim, machine_spec


def forwards(*host_ports: int) -> dict[str, object]:
    return {"ports": [{"port": 80, "hostPort": p} for p in host_ports]}


def test_a_host_port_outside_the_range_is_refused_naming_field_and_range(
    fake_shim: FakeShim,
) -> None:
    reply = fake_shim.client.put(machine_spec("web", network=forwards(30080, 22000)))
    assert reply.status == 422, reply.body
    assert reply.body["error"] == "HostPortNotAllowed"
    assert reply.body["field"] == "network.ports[1].hostPort"
    assert "22000 is outside" in reply.body["message"]
    assert "(30000-32767)" in reply.body["message"]
    assert "--host-port-range" in reply.body["message"]
    assert fake_shim.client.get("web").status == 404, "nothing stored"
    assert fake_shim.client.put(machine_spec("web", network=forwards(30080))).status == 200


def test_the_range_is_configured_on_the_shim() -> None:
    assert config_from(parse_args([])).host_port_range == (30000, 32767)
    args = parse_args(["--host-port-range", "20000-20100"])
    assert config_from(args).host_port_range == (20000, 20100)
    for bad in ("80-90", "2000", "3000-2000", "a-b", "1024-70000"):
        with pytest.raises(argparse.ArgumentTypeError, match="LOW-HIGH"):
            port_range(bad)


def test_the_default_memory_limit_is_configured_on_the_shim() -> None:
    assert config_from(parse_args([])).default_memory_bytes == 1 << 30
    assert config_from(parse_args(["--default-memory", "512Mi"])).default_memory_bytes == 512 << 20
    assert config_from(parse_args(["--default-memory", "0"])).default_memory_bytes is None
    for bad in ("1Mi", "lots", "-1"):
        with pytest.raises(argparse.ArgumentTypeError):
            memory_quantity(bad)
