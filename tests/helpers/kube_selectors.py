"""Label and field selectors, as the API server parses and applies them."""

from __future__ import annotations

import re
from typing import Any

Obj = dict[str, Any]


class SelectorError(ValueError):
    pass


Requirement = tuple[str, str, frozenset[str]]  # key, operator, values
_REQUIREMENT = re.compile(
    r"^\s*(?P<neg>!)?\s*(?P<key>[\w./-]+)\s*"
    r"(?:(?P<op>==|!=|=)\s*(?P<value>[\w./-]*)|\s+(?P<set>in|notin)\s*\((?P<values>[^)]*)\))?\s*$"
)


def parse_selector(text: str) -> list[Requirement]:
    """Label/field selector syntax: k=v, k==v, k!=v, k, !k, k in (a,b), k notin (a,b)."""
    result: list[Requirement] = []
    for part in re.split(r",(?![^()]*\))", text):
        if not part.strip():
            continue
        m = _REQUIREMENT.match(part)
        if m is None:
            raise SelectorError(f"unable to parse requirement: {part!r}")
        if m["op"]:
            result.append((m["key"], "!=" if m["op"] == "!=" else "=", frozenset([m["value"]])))
        elif m["set"]:
            values = frozenset(v.strip() for v in m["values"].split(","))
            result.append((m["key"], m["set"], values))
        else:
            result.append((m["key"], "!" if m["neg"] else "exists", frozenset()))
    return result


def matches(requirements: list[Requirement], values: dict[str, str]) -> bool:
    for key, op, wanted in requirements:
        value = values.get(key)
        ok = {
            "=": value in wanted,
            "in": value in wanted,
            "!=": value not in wanted,
            "notin": value not in wanted,
            "exists": value is not None,
            "!": value is None,
        }[op]
        if not ok:
            return False
    return True


def field_values(obj: Obj) -> dict[str, str]:
    meta = obj["metadata"]
    values = {"metadata.name": meta["name"], "metadata.namespace": meta.get("namespace", "")}
    for section in ("spec", "status"):
        for k, v in (obj.get(section) or {}).items():
            if isinstance(v, str | int | bool):
                values[f"{section}.{k}"] = str(v)
    if obj.get("kind") == "Event":
        for k, v in (obj.get("involvedObject") or {}).items():
            values[f"involvedObject.{k}"] = str(v)
        values["reason"], values["type"] = str(obj.get("reason")), str(obj.get("type"))
    return values
