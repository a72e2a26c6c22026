"""Find the Qwen2.5 tokenizer without needing the network: an explicit folder, a `tokenizer/` folder
near the model files, the Hugging Face cache, a ComfyUI install, and only then a download.
musubi-tuner always downloads it and so fails offline; here the error lists every place looked at."""

from __future__ import annotations

import os
from pathlib import Path

from flowtuner.errors import FlowtunerError

HUB_REPO = "Qwen/Qwen-Image"
HUB_SUBFOLDER = "tokenizer"
COMFY_SUBPATH = Path("comfy") / "text_encoders" / "qwen25_tokenizer"
TOKENIZER_FILES = ("vocab.json", "merges.txt")


def _is_tokenizer_dir(path: Path) -> bool:
    return path.is_dir() and (all((path / f).exists() for f in TOKENIZER_FILES) or (path / "tokenizer.json").exists())


def candidate_dirs(explicit: Path | None, near: list[Path], comfyui_dir: Path | None) -> list[tuple[str, Path | None]]:
    """(label, folder) in lookup order; folder None = resolved later (cache, download)."""
    out: list[tuple[str, Path | None]] = []
    if explicit is not None:
        out.append(("--tokenizer", explicit))
    for base in near:
        folder = base if base.is_dir() else base.parent
        for cand in (folder / "tokenizer", folder.parent / "tokenizer"):
            if ("beside the model files", cand) not in out:
                out.append(("beside the model files", cand))
    out.append(("Hugging Face cache", None))
    comfy = comfyui_dir or (Path(os.environ["COMFYUI_PATH"]) if os.environ.get("COMFYUI_PATH") else None)
    if comfy is not None:
        out.append(("ComfyUI install", comfy / COMFY_SUBPATH))
    out.append(("download", None))
    return out


def _hub_folder(local_only: bool) -> Path:
    """The tokenizer/ folder of the hub repo, from the local cache or downloaded. Resolved as a folder
    and checked like any other: transformers' from_pretrained with local_files_only returns an empty
    one-token tokenizer when the files are missing, instead of failing."""
    from huggingface_hub import snapshot_download

    root = snapshot_download(HUB_REPO, allow_patterns=[f"{HUB_SUBFOLDER}/*"], local_files_only=local_only)
    return Path(root) / HUB_SUBFOLDER


def _load_dir(folder: Path):
    from transformers import Qwen2Tokenizer

    tok = Qwen2Tokenizer.from_pretrained(str(folder))
    if tok.convert_tokens_to_ids("<|im_start|>") in (None, tok.unk_token_id):
        raise FlowtunerError(f"{folder}: not a Qwen2.5 tokenizer (no <|im_start|> token, {len(tok)} tokens).")
    return tok


def load_tokenizer(explicit: Path | None = None, near: list[Path] | None = None, comfyui_dir: Path | None = None):
    looked: list[str] = []
    offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")
    for label, folder in candidate_dirs(explicit, near or [], comfyui_dir):
        if folder is not None:
            if _is_tokenizer_dir(folder):
                return _load_dir(folder)
            looked.append(f"{folder} ({label})")
            if label == "--tokenizer":
                raise FlowtunerError(f"{folder}: not a tokenizer folder (needs vocab.json + merges.txt or tokenizer.json).")
            continue
        if label == "download" and offline:
            looked.append("download (skipped: HF_HUB_OFFLINE is set)")
            continue
        try:
            folder = _hub_folder(local_only=(label != "download"))
        except Exception as exc:  # hub errors vary by version; each means "not there"
            looked.append(f"{HUB_REPO}/{HUB_SUBFOLDER} ({label}: {type(exc).__name__})")
            continue
        if _is_tokenizer_dir(folder):
            return _load_dir(folder)
        looked.append(f"{folder} ({label}: incomplete)")
    raise FlowtunerError(
        "no Qwen2.5 tokenizer found; looked in: " + "; ".join(looked)
        + ". Pass --tokenizer DIR (a folder with vocab.json and merges.txt) or --comfyui_dir."
    )
