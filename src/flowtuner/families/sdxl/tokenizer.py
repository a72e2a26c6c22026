"""Find the CLIP tokenizer of SDXL's two text encoders without the network.

CLIP-L and OpenCLIP-bigG read the same 49408-token BPE vocabulary; they differ only in the padding id, which
belongs to the encoder, not to the files (text.py: CLIP-L pads with the end token, bigG with id 0 -- ComfyUI's
`pad_with_end=False` for clip_g, diffusers' tokenizer_2 pad "!" = id 0). One tokenizer folder therefore serves
both. Looked for, in order: `--tokenizer DIR`; beside the model files (a diffusers folder's tokenizer/ or
tokenizer_2/); a ComfyUI install's comfy/sd1_tokenizer (`--comfyui_dir` / COMFYUI_PATH); the Hugging Face
cache (openai/clip-vit-large-patch14, or an SDXL repo's tokenizer/). Never downloaded: a miss is one line
saying what to pass."""

from __future__ import annotations

import os
from pathlib import Path

from flowtuner.errors import FlowtunerError

TOKENIZER_FILES = ("vocab.json", "merges.txt")
COMFY_SUBPATH = Path("comfy") / "sd1_tokenizer"
NEAR_SUBFOLDERS = ("tokenizer", "tokenizer_2")
# (hub repo, subfolder) looked up in the local Hugging Face cache only
HUB_CACHED = (
    ("openai/clip-vit-large-patch14", ""),
    ("stabilityai/stable-diffusion-xl-base-1.0", "tokenizer"),
)
VOCAB_SIZE = 49408
START_TOKEN, END_TOKEN = "<|startoftext|>", "<|endoftext|>"


def _is_tokenizer_dir(path: Path) -> bool:
    return path.is_dir() and all((path / f).exists() for f in TOKENIZER_FILES)


def _near_dirs(near: list[Path]) -> list[Path]:
    out: list[Path] = []
    for base in near:
        folder = base if base.is_dir() else base.parent
        for root in (folder, folder.parent):
            for sub in NEAR_SUBFOLDERS:
                if root / sub not in out:
                    out.append(root / sub)
    return out


def candidate_dirs(explicit: Path | None, near: list[Path], comfyui_dir: Path | None) -> list[tuple[str, Path | None]]:
    """(label, folder) in lookup order; folder None = the Hugging Face cache, resolved when reached."""
    out: list[tuple[str, Path | None]] = []
    if explicit is not None:
        out.append(("--tokenizer", explicit))
    out += [("beside the model files", d) for d in _near_dirs(near)]
    comfy = comfyui_dir or (Path(os.environ["COMFYUI_PATH"]) if os.environ.get("COMFYUI_PATH") else None)
    if comfy is not None:
        out.append(("ComfyUI install", comfy / COMFY_SUBPATH))
    out.append(("Hugging Face cache", None))
    return out


def _cached_dirs() -> list[tuple[str, Path | None]]:
    """The cached tokenizer folders of HUB_CACHED (None where not cached); never downloads."""
    from huggingface_hub import try_to_load_from_cache

    out: list[tuple[str, Path | None]] = []
    for repo, sub in HUB_CACHED:
        files = [try_to_load_from_cache(repo, f"{sub}/{name}" if sub else name) for name in TOKENIZER_FILES]
        found = all(isinstance(f, str) for f in files)
        out.append((f"{repo}/{sub}" if sub else repo, Path(files[0]).parent if found else None))
    return out


def _load_dir(folder: Path):
    from transformers import CLIPTokenizer

    tok = CLIPTokenizer.from_pretrained(str(folder))
    start, end = tok.convert_tokens_to_ids(START_TOKEN), tok.convert_tokens_to_ids(END_TOKEN)
    if len(tok) != VOCAB_SIZE or (start, end) != (VOCAB_SIZE - 2, VOCAB_SIZE - 1):
        raise FlowtunerError(f"{folder}: not the CLIP tokenizer SDXL uses ({len(tok)} tokens, start/end ids "
                             f"{start}/{end}; expected {VOCAB_SIZE} tokens, {VOCAB_SIZE - 2}/{VOCAB_SIZE - 1}).")
    return tok


def load_tokenizer(explicit: Path | None = None, near: list[Path] | None = None, comfyui_dir: Path | None = None):
    """The CLIP tokenizer (transformers' CLIPTokenizer, the class ComfyUI uses) from the first folder found."""
    looked: list[str] = []
    for label, folder in candidate_dirs(explicit, near or [], comfyui_dir):
        if folder is None:
            for repo, cached in _cached_dirs():
                if cached is not None and _is_tokenizer_dir(cached):
                    return _load_dir(cached)
                looked.append(f"{repo} ({label})")
            continue
        if _is_tokenizer_dir(folder):
            return _load_dir(folder)
        if label == "--tokenizer":
            raise FlowtunerError(f"--tokenizer {folder}: not a CLIP tokenizer folder (needs vocab.json and merges.txt).")
        looked.append(f"{folder} ({label})")
    raise FlowtunerError(
        "no CLIP tokenizer found for SDXL; looked in: " + "; ".join(looked)
        + ". Pass --tokenizer DIR (a folder with CLIP's vocab.json and merges.txt, e.g. a diffusers SDXL folder's "
        "tokenizer/ or ComfyUI's comfy/sd1_tokenizer) or --comfyui_dir."
    )
