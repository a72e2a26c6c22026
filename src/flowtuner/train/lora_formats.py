"""LoRA file formats: tables of key patterns plus pure functions between them and the canonical
{module path: LoRAWeights}. Read: kohya/musubi, diffusers/PEFT, ComfyUI / ai-toolkit, bare
down/up (Lightning), PEFT with adapter name (DiffSynth). Write: kohya (default), diffusers, comfyui.

kohya names flatten the module path (`transformer_blocks.0.attn.to_q` -> `lora_unet_transformer_blocks_0_attn_to_q`);
they are mapped back with the model family's table of LoRA-able module names, not by guessing
which underscores were dots.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import torch

from flowtuner.errors import ConfigError
from flowtuner.train.lora import LoRAWeights, kohya_name
from flowtuner.weights import atomic_save_safetensors, open_checkpoint

# suffix -> (part, where): part is down / up / alpha
SUFFIXES = {
    ".lora_down.weight": "down", ".lora_up.weight": "up", ".lora_A.weight": "down", ".lora_B.weight": "up",
    ".lora_A.default.weight": "down", ".lora_B.default.weight": "up", ".alpha": "alpha",
}
PREFIXES = ("transformer.", "diffusion_model.", "model.diffusion_model.")
UNSUPPORTED_MARKERS = ("hada_w1_a", "lokr_w1", ".diff", ".dora_scale", "oft_blocks", "lora_mid")
FORMATS = ("kohya", "diffusers", "comfyui")


def _split(key: str) -> tuple[str, str]:
    for suffix, part in SUFFIXES.items():
        if key.endswith(suffix):
            return key[: -len(suffix)], part
    raise ConfigError(f"unrecognised LoRA key {key!r}")


def _path_from_kohya(name: str, module_names: list[str]) -> str:
    m = re.fullmatch(r"lora_unet_transformer_blocks_(\d+)_(.+)", name)
    table = {n.replace(".", "_"): n for n in module_names}
    if m and m.group(2) in table:
        return f"transformer_blocks.{m.group(1)}.{table[m.group(2)]}"
    rest = name.removeprefix("lora_unet_")
    if rest in table:
        return table[rest]
    raise ConfigError(f"kohya LoRA name {name!r} matches no module of this model family")


def parse_lora(tensors: dict[str, torch.Tensor], metadata: dict[str, str], block_modules: list[str],
               stem_modules: list[str], source: str) -> dict[str, LoRAWeights]:
    """Any supported layout -> {module path: LoRAWeights}. `block_modules` are paths inside a block
    (`attn.to_q`), `stem_modules` paths outside blocks (`img_in`)."""
    odd = [k for k in tensors if any(m in k for m in UNSUPPORTED_MARKERS)]
    if odd:
        raise ConfigError(f"{source}: LoHa / LoKr / DoRA / diff LoRAs are not supported (key {odd[0]!r}).")
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        try:
            base, part = _split(key)
        except ConfigError:
            raise ConfigError(f"{source}: unrecognised LoRA key {key!r}.") from None
        if base.startswith("lora_unet_"):
            base = _path_from_kohya(base, block_modules + stem_modules)
        else:
            for prefix in PREFIXES:
                if base.startswith(prefix):
                    base = base[len(prefix):]
                    break
        parts.setdefault(base, {})[part] = value
    peft_alpha = _peft_alpha(metadata)
    out = {}
    for path, p in parts.items():
        if "down" not in p or "up" not in p:
            raise ConfigError(f"{source}: {path} has no {'lora_down/A' if 'down' not in p else 'lora_up/B'} weight.")
        rank = p["down"].shape[0]
        alpha = float(p["alpha"]) if "alpha" in p else (peft_alpha if peft_alpha is not None else rank)
        out[path] = LoRAWeights(p["down"], p["up"], alpha)
    return out


def _peft_alpha(metadata: dict[str, str]) -> float | None:
    """diffusers keeps lora_alpha in the PEFT config stored in the file's metadata."""
    raw = metadata.get("lora_adapter_metadata")
    if not raw:
        return None
    config = json.loads(raw)
    config = config.get("transformer", config) if isinstance(config, dict) else {}
    return float(config["lora_alpha"]) if "lora_alpha" in config else None


def to_tensors(weights: dict[str, LoRAWeights], fmt: str, dtype: torch.dtype | None = None) -> tuple[dict, dict]:
    """{module path: LoRAWeights} -> (tensors, extra metadata) in `fmt`."""
    cast = (lambda t: t.to(dtype)) if dtype else (lambda t: t)  # noqa: E731
    tensors, meta = {}, {}
    for path, w in weights.items():
        if fmt == "kohya":
            name = kohya_name(path)
            tensors.update({f"{name}.lora_down.weight": cast(w.down), f"{name}.lora_up.weight": cast(w.up),
                            f"{name}.alpha": torch.tensor(float(w.alpha))})
        elif fmt == "comfyui":
            name = f"diffusion_model.{path}"
            tensors.update({f"{name}.lora_A.weight": cast(w.down), f"{name}.lora_B.weight": cast(w.up),
                            f"{name}.alpha": torch.tensor(float(w.alpha))})
        elif fmt == "diffusers":
            # no alpha tensor in this format: alpha / rank is folded into both matrices, so the file is
            # exact in loaders that ignore the metadata as well
            root = math.sqrt(w.scale)
            name = f"transformer.{path}"
            tensors.update({f"{name}.lora_A.weight": cast(w.down * root), f"{name}.lora_B.weight": cast(w.up * root)})
        else:
            raise ConfigError(f"--save_format {fmt}: unknown; choose one of {', '.join(FORMATS)}.")
    if fmt == "diffusers":
        ranks = {w.rank for w in weights.values()}
        rank = ranks.pop() if len(ranks) == 1 else max(ranks)
        meta["format"] = "pt"
        meta["lora_adapter_metadata"] = json.dumps({"r": rank, "lora_alpha": rank, "target_modules": sorted(weights)})
    return tensors, meta


def read_lora_file(path: str | Path, block_modules: list[str], stem_modules: list[str]) -> dict[str, LoRAWeights]:
    ckpt = open_checkpoint(path)
    tensors = {k: ckpt.read(k) for k in ckpt.keys()}
    if not tensors:
        raise ConfigError(f"{path}: empty LoRA file.")
    return parse_lora(tensors, ckpt.metadata, block_modules, stem_modules, str(path))


def write_lora_file(weights: dict[str, LoRAWeights], path: str | Path, fmt: str = "kohya",
                    metadata: dict[str, str] | None = None, dtype: torch.dtype | None = None) -> None:
    tensors, extra = to_tensors(weights, fmt, dtype)
    atomic_save_safetensors(tensors, path, {**(metadata or {}), **extra})
