"""The shim's OpenAPI 3.1 document, generated from the API models (never written by hand)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from bitbuilder.hostshim.api import (
    API_VERSION,
    ApiError,
    HostLayersList,
    HostLayersSpec,
    HostLayersStatus,
    ImageList,
    ImageSpec,
    ImageStatus,
    MachineList,
    MachineSpec,
    MachineStatus,
)

Mode = Literal["validation", "serialization"]
_BODIES: list[tuple[type[BaseModel], Mode]] = [
    (MachineSpec, "validation"),
    (ImageSpec, "validation"),
    (HostLayersSpec, "validation"),
]
_REPLIES: list[tuple[type[BaseModel], Mode]] = [
    (MachineStatus, "serialization"),
    (MachineList, "serialization"),
    (ImageStatus, "serialization"),
    (ImageList, "serialization"),
    (HostLayersStatus, "serialization"),
    (HostLayersList, "serialization"),
    (ApiError, "serialization"),
]

_ERRORS = {
    "400": "The body is not valid JSON.",
    "403": "The caller's uid/gid (SO_PEERCRED) is not allowed on this socket.",
    "404": "No such machine, image or route.",
    "405": "The route does not take this method.",
    "409": "Conflicts with the machine's state (restart while suspended; its state file unreadable).",
    "413": "The body is larger than the shim accepts.",
    "415": "The body is not application/json.",
    "422": "The body or a parameter fails validation; `field` names it.",
}


def _name_param(what: str) -> dict[str, Any]:
    return {
        "name": "name",
        "in": "path",
        "required": True,
        "description": f"The {what}'s name, a DNS-1123 label (for PUT: equal to the body's name).",
        "schema": {
            "type": "string",
            "pattern": r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$",
            "maxLength": 63,
        },
    }


def openapi_document() -> dict[str, Any]:
    keys, top = models_json_schema(
        _BODIES + _REPLIES, ref_template="#/components/schemas/{model}", by_alias=True
    )

    def content(model: type[BaseModel], mode: Mode) -> dict[str, Any]:
        return {"application/json": {"schema": keys[(model, mode)]}}

    def ok(model: type[BaseModel] | None, description: str, *errors: str) -> dict[str, Any]:
        replies: dict[str, Any] = {"200": {"description": description}}
        if model is not None:
            replies["200"]["content"] = content(model, "serialization")
        for code in ("403", "404", "405", *errors):
            replies[code] = {
                "description": _ERRORS[code],
                "content": content(ApiError, "serialization"),
            }
        return replies

    def body(model: type[BaseModel]) -> dict[str, Any]:
        return {"required": True, "content": content(model, "validation")}

    writes = ("400", "409", "413", "415", "422")
    keep_data = {
        "name": "keepData",
        "in": "query",
        "required": False,
        "description": "true/false: keep the machine's data (default: the spec's keepDataOnDelete).",
        "schema": {"type": "string", "enum": ["true", "false"]},
    }

    def query(name: str, description: str) -> dict[str, Any]:
        return {"name": name, "in": "query", "required": False, "description": description,
                "schema": {"type": "string"}}  # fmt: skip

    waiting = [
        query("wait", "seconds (at most 60) to wait for the phase to be none of unlessPhase; "
              "the reply comes at that change, or when the time is up (default 0: at once)."),
        query("unlessPhase", "comma-separated phases to wait out (with wait)."),
    ]  # fmt: skip
    paging = [
        query("limit", "at most this many machines (1 to 10000), in name order; the reply's "
              "continue is set when more follow."),
        query("continue", "the continue value of the page before: the next page."),
    ]  # fmt: skip
    machine, image = _name_param("machine"), _name_param("image")
    host_layers = _name_param("host profile")
    prefix = f"/{API_VERSION}"
    paths: dict[str, Any] = {
        "/healthz": {"get": {"summary": "Liveness", "responses": ok(None, "The shim serves.")}},
        "/openapi.json": {
            "get": {"summary": "This document", "responses": ok(None, "OpenAPI 3.1")}
        },
        f"{prefix}/machines": {
            "get": {
                "summary": "All machines, or a page of them",
                "parameters": paging,
                "responses": ok(MachineList, "Every machine's status (or a page's).", "422"),
            }
        },
        f"{prefix}/machines/{{name}}": {
            "parameters": [machine],
            "get": {
                "summary": "One machine (pushed at a phase change with wait)",
                "parameters": waiting,
                "responses": ok(MachineStatus, "Its status.", "409", "422"),
            },
            "put": {
                "summary": "Desired state; reconciled before the reply (idempotent)",
                "requestBody": body(MachineSpec),
                "responses": ok(
                    MachineStatus,
                    "Status after reconciling; source problems are in sourceError.",
                    *writes,
                ),
            },
            "delete": {
                "summary": "Stop and remove the machine",
                "parameters": [keep_data],
                "responses": ok(None, "Removed.", "422"),
            },
        },
        f"{prefix}/machines/{{name}}/restart": {
            "parameters": [machine],
            "post": {
                "summary": "Restart on the applied revision",
                "responses": ok(MachineStatus, "Status after the restart.", "409"),
            },
        },
        f"{prefix}/images": {
            "get": {"summary": "All base images", "responses": ok(ImageList, "Every image.")}
        },
        f"{prefix}/images/{{name}}": {
            "parameters": [image],
            "get": {"summary": "One image", "responses": ok(ImageStatus, "The image.")},
            "put": {
                "summary": "Import a base image (idempotent; sha256- or signature-verified)",
                "requestBody": body(ImageSpec),
                "responses": ok(ImageStatus, "The imported image.", *writes),
            },
            "delete": {
                "summary": "Remove an image no tenant uses",
                "responses": ok(None, "Removed.", "409"),
            },
        },
        f"{prefix}/host/layers": {
            "get": {
                "summary": "Every host profile's layers",
                "responses": ok(HostLayersList, "Each profile's status."),
            }
        },
        f"{prefix}/host/layers/{{name}}": {
            "parameters": [host_layers],
            "get": {"summary": "One profile", "responses": ok(HostLayersStatus, "Its status.")},
            "put": {
                "summary": "Fetch, verify and merge the profile's layers on the host",
                "requestBody": body(HostLayersSpec),
                "responses": ok(
                    HostLayersStatus,
                    "Status after merging; a refused revision is in sourceError or mergeError "
                    "and the merged one stays.",
                    *writes,
                ),
            },
            "delete": {
                "summary": "Unmerge the profile's layers and remove them",
                "responses": ok(None, "Removed."),
            },
        },
    }
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "BitBuilder host shim",
            "version": API_VERSION,
            "description": "Served on a unix socket only; callers are checked by SO_PEERCRED.",
        },
        "paths": paths,
        "components": {"schemas": top.get("$defs", {})},
    }
