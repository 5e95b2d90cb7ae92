"""What this host allows a spec beyond the contract's own checks: host settings, not the
tenant's. A port forward must take a host port from the configured range (so a tenant never
takes the port of a host service).

Checked when a spec is accepted (PUT), not when a stored one starts: a machine accepted under
an earlier range, or restored at boot without the shim's flags, still runs."""

from __future__ import annotations

from bitbuilder.hostshim.api import MachineSpec
from bitbuilder.hostshim.config import ShimConfig


def host_port_refusal(spec: MachineSpec, config: ShimConfig) -> tuple[str, str] | None:
    """(message, field) for the first forward outside the host port range, or None."""
    low, high = config.host_port_range
    for i, forward in enumerate(spec.network.ports):
        if not low <= forward.host_port <= high:
            field = f"network.ports[{i}].hostPort"
            return (
                f"{field}: {forward.host_port} is outside the host ports this host gives "
                f"tenants ({low}-{high}): pick one in that range, or widen the shim's "
                "--host-port-range",
                field,
            )
    return None
