"""Shared fixtures: the real tokenizer from ../shared (skipped with a reason when absent, failed in CI), the
vendored peers (`comfy`, `musubi`: tests/shared.py) and a tiny Qwen-Image model set saved in every layout
users have."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never touch the network

from tests.shared import SHARED, comfy, musubi, shared_path  # noqa: F401  (fixtures)
from tests.comfy_server import comfy_server  # noqa: F401,E402  (fixture: a headless ComfyUI with the pack)


@pytest.fixture(scope="session")
def qwen_tokenizer_dir() -> Path:
    return shared_path("fixtures/tokenizers/qwen25/vocab.json").parent


@pytest.fixture(scope="session")
def qwen_tokenizer(qwen_tokenizer_dir):
    from transformers import Qwen2Tokenizer

    return Qwen2Tokenizer.from_pretrained(str(qwen_tokenizer_dir))


@pytest.fixture(scope="session")
def tiny_models():
    from flowtuner.families.qwen_image.tiny import tiny_dit, tiny_text_encoder, tiny_vae

    return {"dit": tiny_dit(), "vae": tiny_vae(), "te": tiny_text_encoder()}


@pytest.fixture(scope="session")
def tiny_files(tiny_models, qwen_tokenizer_dir, tmp_path_factory):
    """The same tiny weights as a Hugging Face repo root and as ComfyUI single files."""
    from tests.layouts import write_comfyui_files, write_hf_repo

    root = tmp_path_factory.mktemp("tiny")
    repo = write_hf_repo(tiny_models, qwen_tokenizer_dir, root / "repo")
    comfy = write_comfyui_files(tiny_models, root / "ComfyUI")
    tok = root / "tokenizer"
    shutil.copytree(qwen_tokenizer_dir, tok)
    return {"repo": repo, "comfy": comfy, "tokenizer": tok}

