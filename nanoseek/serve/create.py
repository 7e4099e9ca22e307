"""New store entries from the server and the command line, after Ollama's `/api/create` and `/api/copy`
(`server/create.go`, `api/types.go`) and `ollama create NAME -f Modelfile`:

    POST /api/create   model, from (a store model or a checkpoint folder), system, template, license,
                       parameters {name: value}, messages [{role, content}], modelfile (the text of
                       a Modelfile, as older clients send), stream (true: NDJSON status lines)
    POST /api/copy     source, destination

The new entry is a copy of the base checkpoint whose manifest carries the defaults (modelfile.py);
`quantize`, `files` (uploaded blobs) and `adapters` are refused with a 400 naming the field.
"""

from __future__ import annotations

import os
from typing import Any

from fastapi import APIRouter, Request
from starlette.concurrency import run_in_threadpool

from ..infer.store import InvalidName, ModelNotFound, Store, StoreError, canonical_name
from .jobs import JobStream
from .modelfile import MESSAGE_ROLES, PARAMETER_TYPES, ModelfileError, defaults_of, parse_modelfile
from .protocol import APIError, Body, Str, bad, json_response, ndjson_line, parse_json_body, short, validate

router = APIRouter()


class CreateRequest(Body):
    model: Any = None
    name: Any = None  # the field's older name
    modelfile: Str | None = None
    stream: Any = None
    quantize: Any = None
    files: Any = None
    adapters: Any = None
    template: Str | None = None
    system: Str | None = None
    license: Any = None
    parameters: Any = None
    messages: Any = None


class CopyRequest(Body):
    source: Any = None
    destination: Any = None


def resolve_source(store: Store, source: str, base_dir: str | None = None) -> str:
    """A FROM value as a checkpoint folder: a store model's, else a folder (relative to `base_dir`)."""
    try:
        return store.path_of(canonical_name(source))
    except (InvalidName, ModelNotFound):
        pass
    path = os.path.expanduser(source)
    if base_dir and not os.path.isabs(path):
        path = os.path.join(base_dir, path)
    if os.path.isdir(path):
        return os.path.abspath(path)
    raise ModelNotFound(f"FROM {source!r}: neither a model in the store nor a checkpoint folder")


def _parameters(value) -> dict:
    """A request's `parameters` object checked against the Modelfile's PARAMETER types."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise bad("parameters", f"expected an object, got {short(value)}")
    out = {}
    for k, v in value.items():
        kind = PARAMETER_TYPES.get(k)
        if kind is None:
            raise bad(f"parameters.{k}", "unknown parameter")
        if k == "stop":
            vs = [v] if isinstance(v, str) else v
            if not isinstance(vs, list) or not all(isinstance(s, str) for s in vs):
                raise bad("parameters.stop", "expected a string or an array of strings")
            out[k] = list(vs)
        elif isinstance(v, bool) or not isinstance(v, (int, float)) or (kind is int and v != int(v)):
            raise bad(f"parameters.{k}", f"expected {'an integer' if kind is int else 'a number'}, got {short(v)}")
        else:
            out[k] = kind(v)
    return out


def _messages(value) -> list[dict]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise bad("messages", f"expected an array, got {short(value)}")
    out = []
    for i, m in enumerate(value):
        if not isinstance(m, dict) or m.get("role") not in MESSAGE_ROLES or not isinstance(m.get("content"), str):
            raise bad(f"messages[{i}]", "expected {\"role\": system | user | assistant, \"content\": string}")
        out.append({"role": m["role"], "content": m["content"]})
    return out


def create_request_spec(body: CreateRequest) -> dict:
    """The request as a parsed Modelfile: its `modelfile` text, overlaid by the structured fields."""
    for key in ("quantize", "files", "adapters"):
        if getattr(body, key):
            raise bad(key, f"{key} is not supported by nanoseek (create from a store model or checkpoint folder)")
    if body.modelfile:
        try:
            spec = parse_modelfile(body.modelfile)
        except ModelfileError as e:
            raise bad("modelfile", str(e)) from None
    else:
        spec = {"parameters": {}, "messages": []}
    source = body.model_extra.get("from") if body.model_extra else None
    if source is not None:
        if not isinstance(source, str) or not source:
            raise bad("from", f"expected a model name or a checkpoint folder, got {short(source)}")
        spec["from"] = source
    if not spec.get("from"):
        raise bad("from", "is required (a model name from the store, or a checkpoint folder)")
    for key in ("system", "template"):
        if getattr(body, key):
            spec[key] = getattr(body, key)
    if body.license is not None:
        lic = body.license
        if isinstance(lic, list) and all(isinstance(x, str) for x in lic):
            lic = "\n".join(lic)
        if not isinstance(lic, str):
            raise bad("license", "expected a string or an array of strings")
        spec["license"] = lic
    spec["parameters"] = {**spec["parameters"], **_parameters(body.parameters)}
    spec["messages"] = spec["messages"] + _messages(body.messages)
    return spec


@router.post("/api/create")
async def create(request: Request):
    app = request.app.state.nanoseek
    body = validate(CreateRequest, parse_json_body(await request.body()))
    name = body.model if body.model is not None else body.name
    if not isinstance(name, str) or not name:
        raise bad("model", "is required (the new model's name[:tag])")
    try:
        cname = canonical_name(name)
    except InvalidName as e:
        raise APIError(400, str(e), param="model") from None
    if body.stream is not None and not isinstance(body.stream, bool):
        raise bad("stream", f"expected a boolean, got {short(body.stream)}")
    spec = create_request_spec(body)
    try:
        src = resolve_source(app.store, spec["from"])
    except ModelNotFound as e:
        raise APIError(404, str(e), param="from") from None
    try:
        await run_in_threadpool(app.models.unload, cname)  # a replaced model must not stay loaded
        await run_in_threadpool(app.store.create, cname, src, True, None, defaults_of(spec))
    except StoreError as e:
        raise APIError(400, str(e), param="from") from None
    if body.stream is False:
        return json_response({"status": "success"}, ollama=True)

    async def lines():
        for status in ("reading model metadata", "writing manifest", "success"):
            yield ndjson_line({"status": status})

    return JobStream(lines(), "application/x-ndjson", lambda: None)


@router.post("/api/copy")
async def copy(request: Request):
    app = request.app.state.nanoseek
    body = validate(CopyRequest, parse_json_body(await request.body()))
    src = app.models.resolve(body.source, param="source")
    if not isinstance(body.destination, str) or not body.destination:
        raise bad("destination", "is required (the new name[:tag])")
    try:
        dst = canonical_name(body.destination)
    except InvalidName as e:
        raise APIError(400, str(e), param="destination") from None
    try:
        await run_in_threadpool(app.models.unload, dst)
        await run_in_threadpool(app.store.copy, src, dst, True)
    except StoreError as e:
        raise APIError(400, str(e), param="destination") from None
    return json_response({}, ollama=True)


def create_from_modelfile(store: Store, name: str, modelfile: str, source: str | None = None,
                          force: bool = False) -> tuple[dict, str]:
    """`ollama create NAME -f Modelfile`: the store entry made from the Modelfile's FROM (or
    `source`), with its defaults; (its manifest, the checkpoint folder it was copied from).
    Raises OSError (the file), ModelfileError and StoreError."""
    with open(modelfile, encoding="utf-8") as f:
        spec = parse_modelfile(f.read())
    src = resolve_source(store, source or spec["from"], os.path.dirname(os.path.abspath(modelfile)))
    return store.create(name, src, force=force, defaults=defaults_of(spec)), src
