"""Command-line options generated from a settings dataclass, so that each option is declared once.

`add_options(parser, cls)` adds one flag per field of `cls` (TrainArgs, GRPOArgs, SFTOptions, the
server's and the quickstart's options): `--field-name`, whose default is the field's default and
whose help shows it ("(default 0.1)"), so that no help string repeats a default. The annotation
gives the type:
  int, float, str          one value of that type; `X | None` takes an X (left off: None)
  Literal["a", "b"]        one of the choices
  bool                     a pair of switches, --x and --no-x
  list[X]                  one or more values (`--data a.txt b.txt`)
  tuple[X, ...]            one comma-separated value (`--lora-targets attn,mlp`)
Help comes from `field(metadata={"help": ...})` or from a dict beside the dataclass (`helps`).
The metadata may also give a "metavar", "aliases" (more spellings of the flag), "flags" (the flag's
own spellings in place of --field-name, as `("-f", "--file")`; for a bool: on then off, or the on
spelling alone for a switch without a negation), "choices" (the allowed values of an int, float or
str field, where they are a table's keys rather than a Literal), "append" (a repeatable flag
collecting a list) and "positional" (a positional argument, not a flag: with a default it may be
left off, and a list[X] takes one or more values). A field of any other type has no flag: leave it
out with `skip`, or the parser refuses to build.

`options(cls, args)` makes the dataclass back from the parsed namespace.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
from typing import Literal, Union, get_args, get_origin, get_type_hints


class Switch(argparse.Action):
    """A bool option and its negation: the `on` spellings store True, the others False."""

    def __init__(self, option_strings, dest, on=(), default=None, required=False, help=None, metavar=None):
        super().__init__(option_strings, dest, nargs=0, default=default, required=required, help=help)
        self.on = frozenset(on)

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, option_string in self.on)

    def format_usage(self) -> str:
        return " | ".join(self.option_strings)


def flag_name(name: str) -> str:
    return "--" + name.replace("_", "-")


def _without_none(tp):
    """X for `X | None` (and Optional[X]); the type itself otherwise."""
    if get_origin(tp) in (Union, types.UnionType):
        rest = [a for a in get_args(tp) if a is not type(None)]
        if len(rest) == 1:
            return rest[0]
    return tp


def comma_separated(kind):
    def parse(text: str) -> tuple:
        return tuple(kind(part.strip()) for part in text.split(",") if part.strip())
    parse.__name__ = f"comma-separated {kind.__name__}"
    return parse


def _shown(value) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, (tuple, list)):
        return ",".join(map(str, value))
    return str(value)


def _default(f: dataclasses.Field):
    """(default, whether to show it): a factory's value is used but not shown."""
    if f.default is not dataclasses.MISSING:
        return f.default, f.default is not None
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory(), False
    return None, False


def add_positional(parser: argparse.ArgumentParser, name: str, tp, default, must: bool, text: str, meta) -> None:
    """A positional argument: one value; one that may be left off (taking the field's default) where
    the field has a default; one or more values for a list[X] field."""
    kw = {"help": text or None}
    kind = tp
    if get_origin(tp) is list and len(get_args(tp)) == 1:
        kind = get_args(tp)[0]
        kw["nargs"] = "+"
    elif not must:
        kw.update(nargs="?", default=default)
    if kind is not str:
        kw["type"] = kind
    if meta.get("metavar"):
        kw["metavar"] = meta["metavar"]
    parser.add_argument(name, **kw)


def add_options(parser: argparse.ArgumentParser, cls, *, helps: dict | None = None, skip=(), required=()) -> None:
    """One flag per field of the dataclass `cls`, except those in `skip`; those in `required` (and
    fields without a default) must be given. `helps`: help text by field name, before the metadata's."""
    hints = get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        meta = f.metadata
        tp = _without_none(hints[f.name])
        default, show = _default(f)
        must = f.name in required or (f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING)
        text = (helps or {}).get(f.name) or meta.get("help") or ""
        if meta.get("positional"):
            add_positional(parser, f.name, tp, default, must, text, meta)
            continue
        switch = tp is bool and len(meta.get("flags", ())) == 1  # a switch without a negation: off unless given
        if show and not must and not switch:
            text = f"{text} (default {_shown(default)})".strip()
        kw = dict(dest=f.name, default=None if must else default, required=must, help=text or None)
        if meta.get("metavar"):
            kw["metavar"] = meta["metavar"]
        flags = [*(meta.get("flags") or (flag_name(f.name),)), *meta.get("aliases", ())]
        if switch:
            parser.add_argument(*meta["flags"], action="store_true", **kw)
            continue
        if tp is bool:
            on, off = meta.get("flags", (flag_name(f.name), "--no-" + f.name.replace("_", "-")))
            parser.add_argument(on, off, action=Switch, on=(on,), **kw)
            continue
        if meta.get("choices") is not None:
            if tp not in (int, float, str):
                raise TypeError(f"{cls.__name__}.{f.name}: choices need an int, float or str field, "
                                f"not {hints[f.name]}")
            kw.update(type=tp, choices=list(meta["choices"]))
        elif get_origin(tp) is Literal:
            choices = get_args(tp)
            kw.update(type=type(choices[0]), choices=list(choices))
        elif get_origin(tp) is list and len(get_args(tp)) == 1:
            kw.update(type=get_args(tp)[0], **({"action": "append"} if meta.get("append") else {"nargs": "+"}))
        elif get_origin(tp) is tuple and get_args(tp)[1:] == (Ellipsis,):
            kw["type"] = comma_separated(get_args(tp)[0])
        elif tp in (int, float, str):
            kw["type"] = tp
        else:
            raise TypeError(f"{cls.__name__}.{f.name}: no command-line flag for a field of type {hints[f.name]}; "
                            "give it a plain type or leave it out with skip=")
        parser.add_argument(*flags, **kw)


def options(cls, args: argparse.Namespace, **changes):
    """The dataclass `cls` from the parsed flags that are its fields (the others keep their
    defaults), with `changes` on top."""
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{**{k: v for k, v in vars(args).items() if k in names}, **changes})
