"""Access to ../shared (fixtures and the vendored peers) for tests.

Without ../shared a test is skipped with a reason on a developer's machine and fails with that reason in CI
(`CI=true`), where ../shared is always laid beside the checkout. The vendored peers (ComfyUI, musubi-tuner)
are extracted once per machine into a cache folder and imported from there; flowtuner never imports them.
"""

from __future__ import annotations

import hashlib
import importlib.machinery
import os
import shutil
import sys
import tarfile
import tempfile
import types
from pathlib import Path

import pytest

SHARED = Path(__file__).resolve().parents[2] / "shared"
VENDOR = SHARED / "vendor"
TARBALLS = {"comfyui": ("comfyui-a125cd8.tar.gz", "ComfyUI"), "musubi": ("musubi-tuner-30c658c.tar.gz", "musubi-tuner")}


def missing(reason: str):
    """Skip on a developer's machine, fail in CI: ../shared is part of CI's contract."""
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail(f"{reason} (CI=true: ../shared must be beside the checkout)", pytrace=False)
    pytest.skip(reason)


def shared_path(relative: str) -> Path:
    path = SHARED / relative
    if not path.exists():
        missing(f"{path} not found (../shared is absent)")
    return path


def _extract(name: str) -> Path:
    tar_name, top = TARBALLS[name]
    tarball = shared_path(f"vendor/{tar_name}")
    digest = hashlib.sha256(f"{tarball.stat().st_size}:{tarball.stat().st_mtime_ns}".encode()).hexdigest()[:12]
    root = Path(tempfile.gettempdir()) / "flowtuner-vendor" / f"{name}-{digest}"
    if not (root / top).is_dir():
        root.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=root.parent, prefix=f".{name}-"))
        with tarfile.open(tarball) as tar:
            tar.extractall(staging, filter="data")
        try:
            staging.rename(root)
        except OSError:  # another process extracted it first
            shutil.rmtree(staging, ignore_errors=True)
    return root / top


def _stub_missing_media_packages() -> None:
    """The CPU torch wheel has no working torchvision / torchaudio. The peers import them at module level but
    their sampling, dataset and LoRA code never calls them, so empty modules stand in. transformers decides
    once whether torchvision exists; it is imported first so that the stand-ins do not fool it."""
    import diffusers  # noqa: F401
    import transformers.image_utils  # noqa: F401
    import transformers.modeling_utils  # noqa: F401

    for name in ("torchvision", "torchvision.transforms", "torchvision.transforms.functional",
                 "torchvision.transforms.v2", "torchvision.io", "torchvision.utils", "torchaudio"):
        try:
            __import__(name)
            continue
        except Exception:  # noqa: BLE001 - a broken real install counts as missing
            pass
        module = types.ModuleType(name)
        module.__spec__ = importlib.machinery.ModuleSpec(name, None)
        module.__path__ = []
        sys.modules[name] = module
        parent, _, child = name.rpartition(".")
        if parent:
            setattr(sys.modules[parent], child, module)


def comfyui_root() -> Path:
    """Import path of the vendored ComfyUI, set up for CPU use (`comfy.*`, `comfy_extras.*` importable)."""
    root = _extract("comfyui")
    if str(root) not in sys.path:
        _stub_missing_media_packages()
        sys.path.insert(0, str(root))
        import comfy.cli_args

        comfy.cli_args.args.cpu = True  # model_management asks CUDA for the device at import otherwise
    return root


def musubi_root() -> Path:
    """Import path of the vendored musubi-tuner (`musubi_tuner.*` importable)."""
    root = _extract("musubi")
    src = root / "src"
    if str(src) not in sys.path:
        _stub_missing_media_packages()
        sys.path.insert(0, str(src))
    return root


@pytest.fixture(scope="session")
def comfy():
    """The vendored ComfyUI's `comfy` package."""
    comfyui_root()
    import comfy.samplers  # noqa: F401

    import comfy as package

    return package


@pytest.fixture(scope="session")
def musubi():
    """The vendored musubi-tuner's `musubi_tuner` package."""
    musubi_root()
    import musubi_tuner

    return musubi_tuner
