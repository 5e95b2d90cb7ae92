"""`bitbuilder get tenants`: standalone mode's `kubectl get tenants`, same columns."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path

import yaml

from bitbuilder.operator.localstate import DEFAULT_STATE_DIR, LocalState, TenantRecord, utcnow
from bitbuilder.operator.status import find_condition

COLUMNS = ("NAME", "RUNTIME", "PHASE", "REVISION", "NODE", "READY", "AGE")


def human_age(seconds: float) -> str:
    """kubectl's HumanDuration: '45s', '3m12s', '17m', '5h3m', '20h', '3d4h', '12d', '2y3d'."""
    s = max(0, int(seconds))
    if s < 120:
        return f"{s}s"
    m = s // 60
    if m < 10:
        return f"{m}m{s % 60}s" if s % 60 else f"{m}m"
    if m < 180:
        return f"{m}m"
    h = m // 60
    if h < 8:
        return f"{h}h{m % 60}m" if m % 60 else f"{h}h"
    if h < 48:
        return f"{h}h"
    d = h // 24
    if d < 8:
        return f"{d}d{h % 24}h" if h % 24 else f"{d}d"
    if d < 365 * 2:
        return f"{d}d"
    if d < 365 * 8:
        return f"{d // 365}y{d % 365}d" if d % 365 else f"{d // 365}y"
    return f"{d // 365}y"


def row(record: TenantRecord, now: datetime) -> tuple[str, ...]:
    tenant = record.tenant()
    status = record.status
    ready = find_condition(status, "Ready")
    return (
        record.name,
        tenant.spec.runtime.value,
        status.phase.value if status and status.phase else "",
        (status.short_revision or "") if status else "",
        (status.machine.node or "") if status and status.machine else "",
        ready.status if ready else "",
        human_age((now - record.created).total_seconds()),
    )


def table(rows: Sequence[Sequence[str]], header: Sequence[str] = COLUMNS) -> str:
    """kubectl's layout: columns padded to the widest cell, three spaces apart."""
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = [
        "   ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
        for r in [header, *rows]
    ]
    return "\n".join(lines) + "\n"


def retrying(records: Sequence[TenantRecord]) -> list[str]:
    """What Ready=Unknown says (a problem being retried: the host shim unreachable), once each."""
    conditions = (find_condition(r.status, "Ready") for r in records)
    return sorted({c.message for c in conditions if c is not None and c.status == "Unknown"})


def render(records: Sequence[TenantRecord], output: str, now: datetime) -> str:
    if output in ("json", "yaml"):
        items = [
            r.tenant().model_dump(mode="json", by_alias=True, exclude_none=True) for r in records
        ]
        doc = {"apiVersion": "v1", "kind": "List", "items": items}
        return json.dumps(doc, indent=2) + "\n" if output == "json" else yaml.safe_dump(doc)
    if not records:
        return "No resources found\n"
    return table([row(r, now) for r in records])


def _run(args: argparse.Namespace) -> int:
    state = LocalState(args.state_dir)
    try:
        records = state.records()
    except PermissionError as exc:
        print(f"error: {exc} (the state of `bitbuilder run` is root's)", file=sys.stderr)
        return 1
    if args.names:
        known = {r.name: r for r in records}
        missing = [n for n in args.names if n not in known]
        for name in missing:
            print(f'Error: tenants "{name}" not found', file=sys.stderr)
        records = [known[n] for n in args.names if n in known]
        if missing and not records:
            return 1
    sys.stdout.write(render(records, args.output, utcnow()))
    fleet = state.load_fleet()
    if fleet is not None and args.output == "table":
        for problem in fleet.problems:
            print(f"warning: skipped manifest {problem}", file=sys.stderr)
        if fleet.error:
            print(f"warning: fleet {fleet.source}: {fleet.error}", file=sys.stderr)
    if args.output == "table":
        for message in retrying(records):
            print(f"warning: {message}", file=sys.stderr)
        if records and not state.reconciler_running():
            print(
                f"warning: no `bitbuilder run` is using {state.root}: this is the status it "
                "last recorded, and nothing follows the fleet until one runs",
                file=sys.stderr,
            )
    return 1 if args.names and len(records) < len(args.names) else 0


def register(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = commands.add_parser(
        "get", help="show tenants in standalone mode (like kubectl get tenants)"
    )
    parser.add_argument("resource", choices=["tenants", "tenant", "tn"])
    parser.add_argument("names", nargs="*", metavar="NAME", help="only these tenants")
    parser.add_argument("-o", "--output", choices=["table", "json", "yaml"], default="table")
    parser.add_argument(
        "--state-dir",
        type=Path,
        default=DEFAULT_STATE_DIR,
        help="`bitbuilder run`'s state (default: %(default)s)",
    )
    parser.set_defaults(handler=_run)
