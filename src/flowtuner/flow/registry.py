"""Name -> function tables, filled with a decorator."""

from __future__ import annotations

from collections.abc import Callable


def registrar(table: dict[str, Callable]) -> Callable[[str], Callable[[Callable], Callable]]:
    def register(name: str):
        def deco(fn: Callable) -> Callable:
            table[name] = fn
            return fn
        return deco
    return register
