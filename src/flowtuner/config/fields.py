"""Dataclass fields -> argparse flags. Every field gets `--snake_case` and `--dashed-case`
(musubi-tuner's names), plus any aliases; its `help` metadata is the CLI help and the docs."""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from typing import Any


def opt(default: Any = None, help: str = "", *, aliases: tuple[str, ...] = (), choices=None, metavar=None,
        nargs=None, required: bool = False, repeatable: bool = False, type=None) -> Any:
    """A config field with CLI metadata. `repeatable`: a list flag that may be given several times; `type`: a
    parser for the flag's text when the annotation's type is not enough (e.g. musubi-tuner's "int, float or N%")."""
    meta = {"help": help, "aliases": aliases, "choices": choices, "metavar": metavar, "nargs": nargs, "required": required,
            "repeatable": repeatable, "type": type}
    if isinstance(default, list):
        return dataclasses.field(default_factory=lambda: list(default), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def _base_type(tp: Any) -> tuple[Any, bool]:
    """(element type, is_list) of an annotation such as `int | None` or `list[float]`."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return _base_type(args[0])
    if origin is list:
        return typing.get_args(tp)[0], True
    return tp, False


def flag_names(name: str, aliases: tuple[str, ...] = ()) -> list[str]:
    names = [f"--{name}"]
    if "_" in name:
        names.append(f"--{name.replace('_', '-')}")
    for alias in aliases:
        names += [n for n in flag_names(alias) if n not in names]
    return names


def escape_help(text: str) -> str:
    """argparse %-formats help strings: a bare % ("~30% slower") would print the action's whole dict."""
    return text.replace("%", "%%").replace("%%(default)", "%(default)")


def add_arguments(parser: argparse.ArgumentParser, cls: type, skip: tuple[str, ...] = ()) -> None:
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        meta = f.metadata
        tp, is_list = _base_type(hints[f.name])
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        kwargs: dict[str, Any] = {"dest": f.name, "help": escape_help(meta.get("help", "")), "default": default}
        if tp is bool:
            kwargs["action"] = argparse.BooleanOptionalAction if default else "store_true"
        else:
            kwargs["type"] = meta.get("type") or tp
            kwargs["nargs"] = meta.get("nargs") or ("+" if is_list else None)
            kwargs["choices"] = meta.get("choices")
            kwargs["metavar"] = meta.get("metavar")
            kwargs["required"] = meta.get("required", False)
            if meta.get("repeatable"):
                kwargs["action"] = "extend"
        if default not in (None, False, [], "") and "%(default)" not in kwargs["help"]:
            kwargs["help"] += " (default: %(default)s)"
        parser.add_argument(*flag_names(f.name, meta.get("aliases", ())), **kwargs)


def from_namespace(cls: type, ns: argparse.Namespace):
    return cls(**{f.name: getattr(ns, f.name) for f in dataclasses.fields(cls)})
