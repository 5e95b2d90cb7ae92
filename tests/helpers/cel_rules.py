"""Evaluating a CRD's `x-kubernetes-validations` CEL rules, as the API server does.

The API server runs each rule with `self` bound to the value at the schema node that carries
it, for every value present in the object. cel-python stands in for the server's CEL.
"""

from __future__ import annotations

from functools import cache
from typing import Any

import celpy
from celpy.adapter import json_to_cel
from celpy.evaluation import CELEvalError

Obj = dict[str, Any]


@cache
def _program(rule: str) -> celpy.Runner:
    env = celpy.Environment()
    return env.program(env.compile(rule))


def cel_violations(schema: Obj, value: Any, path: str = "") -> list[str]:
    """`<path>: <message>` for every rule that does not hold on `value` (recursively)."""
    found = [
        f"{path or '<root>'}: {rule.get('message', rule['rule'])}"
        for rule in schema.get("x-kubernetes-validations", [])
        if not _holds(rule["rule"], value)
    ]
    if isinstance(value, dict):
        properties: Obj = schema.get("properties", {})
        extra = schema.get("additionalProperties")
        for key, item in value.items():
            sub = properties.get(key, extra if isinstance(extra, dict) else None)
            if sub is not None:
                found += cel_violations(sub, item, f"{path}.{key}" if path else key)
    elif isinstance(value, list) and isinstance(schema.get("items"), dict):
        for index, item in enumerate(value):
            found += cel_violations(schema["items"], item, f"{path}[{index}]")
    return found


def _holds(rule: str, value: Any) -> bool:
    try:
        result = _program(rule).evaluate({"self": json_to_cel(value)})
    except CELEvalError:
        return False  # the server reports an evaluation error as a failed rule too
    return isinstance(result, celpy.celtypes.BoolType) and bool(result)


def compile_rule(rule: str) -> None:
    """Raise if the rule does not parse (what the API server refuses at CRD creation)."""
    _program(rule)
