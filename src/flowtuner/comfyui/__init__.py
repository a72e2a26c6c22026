"""flowtuner's ComfyUI node pack.

ComfyUI loads `custom_nodes/flowtuner/__init__.py` (written by `flowtuner comfyui install`), which re-exports
the two mappings built here. Each node module is imported on its own: one that fails (a missing package, a
ComfyUI version without an API it needs) is reported with one log line naming it and the reason, and is also
listed in `FAILED`, while the other modules' nodes still register. A pack that silently registers half its
nodes (or none, "missing NODE_CLASS_MAPPINGS") is what the debug notes warn about.

Only this subpackage may import ComfyUI (`comfy`, `folder_paths`, ...), and lazily where it can, so that the
rest of flowtuner never depends on ComfyUI.
"""

from __future__ import annotations

import importlib
import logging

log = logging.getLogger("flowtuner.comfyui")

# node modules under flowtuner.comfyui, each with `NODES: dict[str, type]` and `DISPLAY: dict[str, str]`
MODULES = ("loaders", "text", "sampler", "patches", "debug", "train")

NODE_CLASS_MAPPINGS: dict[str, type] = {}
NODE_DISPLAY_NAME_MAPPINGS: dict[str, str] = {}
FAILED: dict[str, str] = {}  # module -> one-line reason it did not load


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or "(no message)"
    return f"{type(exc).__name__}: {text}"


def _load(name: str) -> None:
    try:
        module = importlib.import_module(f"{__name__}.{name}")
        nodes, display = dict(module.NODES), dict(module.DISPLAY)
    except Exception as exc:  # noqa: BLE001 - any failure is reported, never hidden
        FAILED[name] = _one_line(exc)
        # ComfyUI's logger shows it in the console; without handlers, logging's last resort prints it to stderr
        log.error(f"[flowtuner] node module '{name}' failed to load, its nodes are missing: {FAILED[name]}")
        return
    clash = set(nodes) & set(NODE_CLASS_MAPPINGS)
    if clash:
        FAILED[name] = f"node names already registered by another module: {sorted(clash)}"
        log.error(f"[flowtuner] node module '{name}' skipped: {FAILED[name]}")
        return
    NODE_CLASS_MAPPINGS.update(nodes)
    NODE_DISPLAY_NAME_MAPPINGS.update({key: display.get(key, key) for key in nodes})


for _name in MODULES:
    _load(_name)

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "FAILED", "MODULES"]
