"""`flowtuner comfyui install|uninstall`: put flowtuner's node pack into a ComfyUI, and take it out again.

install writes two things and records them in a manifest inside the pack folder, so that uninstall removes
exactly those and nothing else:
- `custom_nodes/flowtuner/__init__.py`, a three-line shim that re-exports `flowtuner.comfyui`'s mappings;
- unless ComfyUI's Python already imports this flowtuner, a `flowtuner-comfyui.pth` in that Python's
  site-packages naming the folder that holds this flowtuner package. A .pth rather than `pip install`: no
  network, no second copy to keep in step (an editable checkout stays live), and one file to remove. The
  packages flowtuner needs must already be importable by that Python: install checks and names what is missing.
ComfyUI's own files are never touched.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from flowtuner.errors import ConfigError

PACK = "flowtuner"
MANIFEST = ".flowtuner-install.json"
PTH_NAME = "flowtuner-comfyui.pth"
SHIM = (
    '"""flowtuner\'s node pack, written by `flowtuner comfyui install`; `flowtuner comfyui uninstall` removes it."""\n'
    "from flowtuner.comfyui import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS\n"
    '__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]\n'
)
# Pythons a ComfyUI install usually carries, relative to its folder: venvs, and the Windows portable build's.
PYTHON_CANDIDATES = (".venv/bin/python", "venv/bin/python", ".venv/Scripts/python.exe", "venv/Scripts/python.exe",
                     "../python_embeded/python.exe")
# The import names of flowtuner's runtime dependencies that ComfyUI itself does not require.
REQUIRED_IMPORTS = {"torch": "torch", "diffusers": "diffusers", "transformers": "transformers",
                    "safetensors": "safetensors", "accelerate": "accelerate", "PIL": "pillow", "numpy": "numpy",
                    "tqdm": "tqdm", "cv2": "opencv-python-headless"}


def register(sub) -> None:
    p = sub.add_parser("comfyui", help="install or uninstall flowtuner's ComfyUI node pack",
                       description="Adds flowtuner's nodes to a ComfyUI (custom_nodes/flowtuner), using that ComfyUI's "
                                   "Python, or removes exactly what install added. ComfyUI's own files are never changed.")
    actions = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    for name, help_text in (("install", "write custom_nodes/flowtuner and make flowtuner importable by ComfyUI's Python"),
                            ("uninstall", "remove what `flowtuner comfyui install` wrote")):
        a = actions.add_parser(name, help=help_text, description=help_text)
        a.add_argument("--comfyui_dir", "--comfyui-dir", required=True,
                       help="the ComfyUI folder (with main.py), or the folder given to ComfyUI's --base-directory")
        if name == "install":
            a.add_argument("--python",
                           help="the Python that runs ComfyUI (default: a venv inside --comfyui_dir or the portable "
                                "build's python_embeded if present, else the Python running this command)")
        a.set_defaults(handler=ACTIONS[name])
    p.set_defaults(handler=lambda args: p.error("choose install or uninstall"))


def comfyui_folder(text: str) -> Path:
    folder = Path(text).expanduser().resolve()
    if not folder.is_dir():
        raise ConfigError(f"--comfyui_dir {folder}: not a folder; give the ComfyUI folder (the one with main.py).")
    if not ((folder / "main.py").is_file() or (folder / "custom_nodes").is_dir()):
        raise ConfigError(f"--comfyui_dir {folder}: neither main.py nor custom_nodes/ is inside; "
                          "give the ComfyUI folder or its --base-directory.")
    return folder


def find_python(folder: Path, explicit: str | None) -> Path:
    if explicit:
        python = Path(explicit).expanduser()
        if not python.is_file():
            raise ConfigError(f"--python {python}: no such file; give the Python executable that runs ComfyUI.")
        return python.absolute()
    for rel in PYTHON_CANDIDATES:
        if (folder / rel).is_file():
            return (folder / rel).absolute()
    return Path(sys.executable)


def _ask(python: Path, code: str) -> dict:
    try:
        done = subprocess.run([str(python), "-c", code], capture_output=True, text=True, timeout=300)
    except OSError as exc:
        raise ConfigError(f"--python {python}: cannot run it ({exc.strerror}); give the Python that runs ComfyUI.") from None
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise ConfigError(f"--python {python}: failed to answer ({last}); give the Python that runs ComfyUI.")
    return json.loads(done.stdout.strip().splitlines()[-1])


PROBE = """
import importlib.util, json, sysconfig
def where(name):
    try:
        spec = importlib.util.find_spec(name)
    except Exception:
        return None
    return spec.origin if spec else None
print(json.dumps({"purelib": sysconfig.get_paths()["purelib"], "flowtuner": where("flowtuner"),
                  "found": {name: where(name) is not None for name in %r}}))
"""


def probe(python: Path) -> dict:
    """What ComfyUI's Python sees: its site-packages, where flowtuner comes from, which dependencies it has."""
    return _ask(python, PROBE % (sorted(REQUIRED_IMPORTS),))


def package_root() -> Path:
    """The folder holding this flowtuner package (src/ of a checkout, or a site-packages)."""
    import flowtuner

    return Path(flowtuner.__file__).resolve().parent.parent


def _write_text(path: Path, text: str) -> None:
    from flowtuner.weights.writer import atomic_write_bytes

    atomic_write_bytes(text.encode(), path)
    path.chmod(0o644)  # mkstemp makes it private; ComfyUI may run as another user


def install(args) -> int:
    folder = comfyui_folder(args.comfyui_dir)
    pack = folder / "custom_nodes" / PACK
    old = read_manifest(pack)
    if pack.exists() and old is None:
        raise ConfigError(f"{pack} exists and was not written by `flowtuner comfyui install`; move it away first.")
    python = find_python(folder, args.python)
    seen = probe(python)
    written = []
    here = package_root()
    origin = Path(seen["flowtuner"]).resolve().parent.parent if seen["flowtuner"] else None
    if origin is not None and origin != here:
        raise ConfigError(f"{python} already imports another flowtuner from {origin}; uninstall that one "
                          f"(`{python} -m pip uninstall flowtuner`) or run this command with that Python.")
    if origin is None:
        missing = sorted(REQUIRED_IMPORTS[name] for name, ok in seen["found"].items() if not ok)
        if missing:
            raise ConfigError(f"{python} lacks packages flowtuner needs: {', '.join(missing)}; "
                              f"run `{python} -m pip install {' '.join(missing)}`, then install again.")
        pth = Path(seen["purelib"]) / PTH_NAME
        _write_text(pth, f"{here}\n")
        written.append(str(pth))
    pack.mkdir(parents=True, exist_ok=True)
    _write_text(pack / "__init__.py", SHIM)
    written.append(str(pack / "__init__.py"))
    kept = [p for p in (old or {}).get("written", []) if p not in written and Path(p).exists()]
    _write_text(pack / MANIFEST, json.dumps({"python": str(python), "written": written + kept}, indent=2) + "\n")
    how = "via " + str(written[0]) if len(written) > 1 else "already importable"
    print(f"installed flowtuner's nodes into {pack} (ComfyUI's Python {python}: flowtuner {how}); restart ComfyUI.")
    return 0


def read_manifest(pack: Path) -> dict | None:
    path = pack / MANIFEST
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        raise ConfigError(f"{path}: unreadable install record; remove {pack} by hand.") from None


def uninstall(args) -> int:
    folder = comfyui_folder(args.comfyui_dir)
    pack = folder / "custom_nodes" / PACK
    record = read_manifest(pack)
    if record is None:
        if pack.exists():
            raise ConfigError(f"{pack} was not written by `flowtuner comfyui install`; left as it is.")
        raise ConfigError(f"{pack}: not installed, nothing to remove.")
    for path in map(Path, record["written"]):
        path.unlink(missing_ok=True)
    (pack / MANIFEST).unlink()
    _remove_bytecode(pack / "__pycache__")
    try:
        pack.rmdir()
    except OSError:
        print(f"left {pack}: it holds files install did not write ({', '.join(sorted(os.listdir(pack)))}).")
    print(f"uninstalled flowtuner's nodes from {folder}: removed {', '.join(record['written'])}.")
    return 0


def _remove_bytecode(cache: Path) -> None:
    """Python's bytecode of the shim, written when ComfyUI imported it: part of what install brought."""
    if not cache.is_dir():
        return
    for entry in cache.iterdir():
        if entry.name.startswith("__init__.") and entry.suffix == ".pyc":
            entry.unlink()
    try:
        cache.rmdir()
    except OSError:
        pass


ACTIONS = {"install": install, "uninstall": uninstall}
