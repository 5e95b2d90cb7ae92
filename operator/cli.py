"""`bitbuilder`: the command line. This module only wires subcommands together.

Each subcommand lives in its own module, which exposes `register(commands)`: it adds its parser
to `commands` and sets `handler`, a function taking the parsed arguments and returning the exit
status. To add a subcommand, import its module here and append its `register` to COMMANDS.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence

from bitbuilder.operator import crd, demo, get, kubewebhook, standalone

Registrar = Callable[["argparse._SubParsersAction[argparse.ArgumentParser]"], None]

COMMANDS: tuple[Registrar, ...] = (
    crd.register,
    standalone.register,
    get.register,
    demo.register,
    kubewebhook.register,
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bitbuilder",
        description="BitBuilder Hypervisor: git-driven tenant machines (nspawn containers, "
        "vmspawn VMs) on a host, with or without Kubernetes.",
    )
    commands = parser.add_subparsers(title="commands", dest="command", required=True)
    for register in COMMANDS:
        register(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    status: int = args.handler(args)
    return status
