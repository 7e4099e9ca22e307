"""Ollama Modelfiles (after Ollama's `docs/modelfile.md`): parse one into the defaults a store entry
carries, render those defaults back as a Modelfile, and apply them to a request.

    FROM <store model or checkpoint folder>     required
    SYSTEM <text>                               the system prompt when a request sends none
    TEMPLATE <text>                             the chat template (Jinja, as tokenizer_config.json's)
    PARAMETER <name> <value>                    sampling defaults; `stop` may repeat
    MESSAGE <system|user|assistant> <text>      turns put before every conversation
    LICENSE <text>                              kept, shown by /api/show

A value may be quoted `"..."` or, spanning lines, `\"\"\"...\"\"\"`; `#` starts a comment line. The
instruction names are case-insensitive. Defaults never override what a request sends itself.
"""

from __future__ import annotations

import json
import re

# PARAMETER names and their types: the sampling options nanoseek applies, and Ollama's others
# (accepted so that Ollama Modelfiles load; the server ignores them with a warning, as it does in
# a request's `options`)
PARAMETER_TYPES = {
    "temperature": float, "top_p": float, "top_k": int, "seed": int, "num_predict": int, "num_ctx": int,
    "stop": str, "min_p": float, "typical_p": float, "repeat_last_n": int, "repeat_penalty": float,
    "presence_penalty": float, "frequency_penalty": float, "num_keep": int, "mirostat": int,
    "mirostat_tau": float, "mirostat_eta": float, "tfs_z": float, "num_batch": int, "num_gpu": int,
    "num_thread": int,
}
MESSAGE_ROLES = ("system", "user", "assistant")
INSTRUCTIONS = ("from", "system", "template", "parameter", "message", "license", "adapter")


class ModelfileError(ValueError):
    """A Modelfile that cannot be used, naming the line."""


def _unquote(value: str) -> str:
    if len(value) >= 6 and value.startswith('"""') and value.endswith('"""'):
        return value[3:-3]
    if len(value) >= 2 and value.startswith('"') and value.endswith('"'):
        try:
            return json.loads(value)
        except json.JSONDecodeError:
            return value[1:-1]
    return value


def _instructions(text: str):
    """(line number, instruction, raw value) per instruction; triple-quoted values span lines."""
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        line, number = lines[i].strip(), i + 1
        i += 1
        if not line or line.startswith("#"):
            continue
        m = re.match(r"(\S+)\s*(.*)", line, re.S)
        word, rest = m.group(1).lower(), m.group(2).strip()
        if word not in INSTRUCTIONS:
            raise ModelfileError(f"line {number}: unknown instruction {m.group(1)!r} (expected one of "
                                 f"{', '.join(w.upper() for w in INSTRUCTIONS)})")
        if rest.count('"""') == 1:  # a triple-quoted value continues on the lines below
            parts = [rest]
            while i < len(lines) and '"""' not in lines[i]:
                parts.append(lines[i])
                i += 1
            if i == len(lines):
                raise ModelfileError(f"line {number}: unterminated \"\"\" value")
            parts.append(lines[i].rstrip())
            i += 1
            rest = "\n".join(parts)
        yield number, word, rest


def _parameter(number: int, raw: str):
    name, _, value = raw.partition(" ")
    name, value = name.strip().lower(), _unquote(value.strip())
    if name not in PARAMETER_TYPES:
        raise ModelfileError(f"line {number}: unknown PARAMETER {name!r}")
    kind = PARAMETER_TYPES[name]
    try:
        return name, value if kind is str else kind(value)
    except ValueError:
        raise ModelfileError(f"line {number}: PARAMETER {name} expects {'an integer' if kind is int else 'a number'}, "
                             f"got {value!r}") from None


def parse_modelfile(text: str) -> dict:
    """A Modelfile's text as {"from", "system", "template", "license", "parameters", "messages"}
    (absent instructions left out; `parameters["stop"]` is a list)."""
    out: dict = {"parameters": {}, "messages": []}
    for number, word, raw in _instructions(text):
        if word == "parameter":
            name, value = _parameter(number, raw)
            if name == "stop":
                out["parameters"].setdefault("stop", []).append(value)
            else:
                out["parameters"][name] = value
        elif word == "message":
            role, _, content = raw.partition(" ")
            if role.lower() not in MESSAGE_ROLES:
                raise ModelfileError(f"line {number}: MESSAGE role must be system, user or assistant, got {role!r}")
            out["messages"].append({"role": role.lower(), "content": _unquote(content.strip())})
        elif word == "adapter":
            raise ModelfileError(f"line {number}: ADAPTER is not supported by nanoseek (merge the LoRA first)")
        else:
            out[word] = _unquote(raw)
    if not out.get("from"):
        raise ModelfileError("a Modelfile needs a FROM line (a store model name or a checkpoint folder)")
    return out


def defaults_of(parsed: dict) -> dict:
    """The defaults a store entry keeps: what the Modelfile set, without FROM."""
    d = {k: parsed[k] for k in ("system", "template", "license") if parsed.get(k)}
    if parsed.get("parameters"):
        d["parameters"] = dict(parsed["parameters"])
    if parsed.get("messages"):
        d["messages"] = list(parsed["messages"])
    return d


def render_modelfile(source: str, defaults: dict) -> str:
    """Defaults written back as a Modelfile (what /api/show returns as `modelfile`)."""
    q = lambda s: '"""' + s + '"""' if "\n" in s or '"' in s else json.dumps(s)  # noqa: E731
    lines = ["# Modelfile generated by nanoseek", f"FROM {source}"]
    if defaults.get("template"):
        lines.append(f"TEMPLATE {q(defaults['template'])}")
    if defaults.get("system"):
        lines.append(f"SYSTEM {q(defaults['system'])}")
    lines += parameter_lines(defaults)
    lines += [f"MESSAGE {m['role']} {q(m['content'])}" for m in defaults.get("messages", [])]
    if defaults.get("license"):
        lines.append(f"LICENSE {q(defaults['license'])}")
    return "\n".join(lines) + "\n"


def parameter_lines(defaults: dict) -> list[str]:
    out = []
    for k, v in defaults.get("parameters", {}).items():
        for x in (v if isinstance(v, list) else [v]):
            out.append(f"PARAMETER {k} {json.dumps(x) if isinstance(x, str) else x}")
    return out


def with_default_messages(msgs: list[dict], defaults: dict) -> list[dict]:
    """A conversation with the entry's MESSAGE turns before it and its SYSTEM prompt first when the
    conversation has no system message of its own."""
    pre = [dict(m) for m in defaults.get("messages", [])]
    if defaults.get("system") and not any(m["role"] == "system" for m in pre + msgs):
        pre.insert(0, {"role": "system", "content": defaults["system"]})
    return pre + msgs
