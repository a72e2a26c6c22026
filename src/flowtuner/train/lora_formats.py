"""LoRA file formats: tables of key patterns plus pure functions between them and the canonical
{module path: LoRAWeights}. Read: kohya/musubi, diffusers/PEFT, ComfyUI / ai-toolkit, bare
down/up (Lightning), PEFT with adapter name (DiffSynth). Write: kohya (default), diffusers, comfyui.

kohya names flatten the module path (`transformer_blocks.0.attn.to_q` -> `lora_unet_transformer_blocks_0_attn_to_q`);
they are mapped back with the model family's tables (`Family.lora_names()`: its LoRA-able module names and
the path of its blocks), not by guessing which underscores were dots. A family whose kohya names are not its
flattened module paths (SDXL: ldm names, text encoders under `lora_te1_` / `lora_te2_`) gives its stem modules as
a table {module path: kohya name} instead of a list; its files are then read and written with that table, and
written in kohya's layout only.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import safetensors.torch
import torch

from flowtuner.errors import ConfigError
from flowtuner.train.lora import LoRAWeights, kohya_name, natural_key
from flowtuner.weights import atomic_save_safetensors, open_checkpoint

# suffix -> (part, where): part is down / up / alpha
SUFFIXES = {
    ".lora_down.weight": "down", ".lora_up.weight": "up", ".lora_A.weight": "down", ".lora_B.weight": "up",
    ".lora_A.default.weight": "down", ".lora_B.default.weight": "up", ".alpha": "alpha",
}
PREFIXES = ("transformer.", "diffusion_model.", "model.diffusion_model.", "unet.")
UNSUPPORTED_MARKERS = ("hada_w1_a", "lokr_w1", ".diff", ".dora_scale", "lora_magnitude_vector", "oft_blocks", "lora_mid")
# diffusers' save_lora_weights stores the PEFT LoraConfig as JSON under this metadata key, every field
# prefixed with the component it belongs to (training_utils._collate_lora_metadata + lora_base._save_lora_weights)
PEFT_METADATA_KEY = "lora_adapter_metadata"
PEFT_COMPONENT = "transformer."
PEFT_DEFAULT_ALPHA = 8  # peft.LoraConfig's lora_alpha when a config leaves it out


def _split(key: str) -> tuple[str, str]:
    for suffix, part in SUFFIXES.items():
        if key.endswith(suffix):
            return key[: -len(suffix)], part
    raise ConfigError(f"unrecognised LoRA key {key!r}")


def kohya_table(stem_modules: Sequence[str] | Mapping[str, str]) -> Mapping[str, str] | None:
    """A family's {module path: kohya name} when its stem modules come as that table, else None (flattened paths)."""
    return stem_modules if isinstance(stem_modules, Mapping) else None


def _path_from_kohya(name: str, module_names: list[str], blocks: str, source: str) -> str:
    m = re.fullmatch(rf"lora_unet_{re.escape(blocks.replace('.', '_'))}_(\d+)_(.+)", name)
    table = {n.replace(".", "_"): n for n in module_names}
    if m and m.group(2) in table:
        return f"{blocks}.{m.group(1)}.{table[m.group(2)]}"
    rest = name.removeprefix("lora_unet_")
    if rest in table:
        return table[rest]
    raise ConfigError(f"{source}: kohya LoRA name {name!r} matches no LoRA-able layer of this model; "
                      "the LoRA was made for another model (or another --model_version).")


def parse_lora(tensors: dict[str, torch.Tensor], metadata: dict[str, str], block_modules: list[str],
               stem_modules: Sequence[str] | Mapping[str, str], blocks: str, source: str) -> dict[str, LoRAWeights]:
    """Any supported layout -> {module path: LoRAWeights}. `block_modules` are paths inside a block
    (`attn.to_q`), `stem_modules` paths outside blocks (`img_in`) or the table {path: kohya name}, `blocks` the
    path of the blocks' ModuleList: the family's `lora_names()`. kohya names of a table's family are read by the
    table, and as flattened module paths too (ComfyUI reads both for SDXL)."""
    odd = [k for k in tensors if any(m in k for m in UNSUPPORTED_MARKERS)]
    if odd:
        raise ConfigError(f"{source}: LoHa / LoKr / DoRA / diff LoRAs are not supported (key {odd[0]!r}).")
    table = kohya_table(stem_modules)
    spelled = {name: path for path, name in table.items()} if table else None
    modules = list(block_modules) + list(stem_modules)
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        try:
            base, part = _split(key)
        except ConfigError:
            raise ConfigError(f"{source}: unrecognised LoRA key {key!r}.") from None
        value = _linear_matrix(key, value, source)
        if spelled and base in spelled:
            base = spelled[base]
        elif base.startswith("lora_unet_"):
            base = _path_from_kohya(base, modules, blocks, source)
        else:
            for prefix in PREFIXES:
                if base.startswith(prefix):
                    base = base[len(prefix):]
                    break
        parts.setdefault(base, {})[part] = value
    config = _peft_config(metadata, source)
    out = {}
    for path, p in parts.items():
        if "down" not in p or "up" not in p:
            raise ConfigError(f"{source}: {path} has no {'lora_down/A' if 'down' not in p else 'lora_up/B'} weight.")
        rank = p["down"].shape[0]
        alpha = float(p["alpha"]) if "alpha" in p else _peft_alpha(config, path, rank)
        out[path] = LoRAWeights(p["down"], p["up"], rank if alpha is None else alpha)
    return out


def _linear_matrix(key: str, value: torch.Tensor, source: str) -> torch.Tensor:
    """A LoRA matrix as the 2-D one of a Linear: 1x1-convolution LoRAs ([r, in, 1, 1], as kohya writes them for
    1x1 conv layers) are Linear ones; larger kernels are LoCon's convolution LoRAs, which flowtuner does not apply."""
    if value.ndim != 4:
        return value
    if value.shape[2:] != (1, 1):
        raise ConfigError(f"{source}: {key} is a {value.shape[2]}x{value.shape[3]} convolution LoRA (LoCon / "
                          "conv_dim); flowtuner applies LoRAs to Linear layers only: use a LoRA trained without conv_dim.")
    return value.reshape(value.shape[0], value.shape[1])


def _peft_config(metadata: dict[str, str], source: str) -> dict:
    """The PEFT LoraConfig a diffusers file carries, without the component prefix; {} when there is none.
    Files written before diffusers prefixed the fields (and by flowtuner before it followed) are unprefixed."""
    raw = metadata.get(PEFT_METADATA_KEY)
    if not raw:
        return {}
    try:
        config = json.loads(raw)
    except json.JSONDecodeError:
        raise ConfigError(f"{source}: its {PEFT_METADATA_KEY} metadata is not JSON.") from None
    if not isinstance(config, dict):
        return {}
    component = {k[len(PEFT_COMPONENT):]: v for k, v in config.items() if k.startswith(PEFT_COMPONENT)}
    config = component or config
    if config.get("use_dora"):
        raise ConfigError(f"{source}: LoHa / LoKr / DoRA / diff LoRAs are not supported (use_dora in its PEFT config).")
    return config


def _peft_alpha(config: dict, path: str, rank: int) -> float | None:
    """alpha of one module under a PEFT config (alpha_pattern keys match a path's tail, as in PEFT), expressed
    for scale = alpha / rank; None without a config (then alpha = rank: the matrices hold the whole delta)."""
    if not config:
        return None
    alpha = config.get("lora_alpha", PEFT_DEFAULT_ALPHA)
    for key, value in (config.get("alpha_pattern") or {}).items():
        if re.match(rf"(.*\.)?({key})$", path):
            alpha = value
            break
    # rsLoRA scales by alpha / sqrt(rank)
    return float(alpha) * (math.sqrt(rank) if config.get("use_rslora") else 1.0)


def _kohya(weights: dict[str, LoRAWeights], cast, table: Mapping[str, str] | None = None) -> tuple[dict, dict]:
    tensors = {}
    for path, w in weights.items():
        name = table[path] if table else kohya_name(path)
        tensors.update({f"{name}.lora_down.weight": cast(w.down), f"{name}.lora_up.weight": cast(w.up),
                        f"{name}.alpha": torch.tensor(float(w.alpha))})
    return tensors, {}


def _comfyui(weights: dict[str, LoRAWeights], cast) -> tuple[dict, dict]:
    tensors = {}
    for path, w in weights.items():
        name = f"diffusion_model.{path}"
        tensors.update({f"{name}.lora_A.weight": cast(w.down), f"{name}.lora_B.weight": cast(w.up),
                        f"{name}.alpha": torch.tensor(float(w.alpha))})
    return tensors, {}


def _diffusers(weights: dict[str, LoRAWeights], cast) -> tuple[dict, dict]:
    """No alpha tensor in this format: alpha / rank is folded into both matrices, so the file is exact in
    loaders that ignore the metadata as well; the PEFT config then says lora_alpha = r (scale 1)."""
    tensors = {}
    for path, w in weights.items():
        root = math.sqrt(w.scale)
        name = f"{PEFT_COMPONENT}{path}"
        tensors.update({f"{name}.lora_A.weight": cast(w.down * root), f"{name}.lora_B.weight": cast(w.up * root)})
    return tensors, {"format": "pt", PEFT_METADATA_KEY: json.dumps(peft_config(weights), indent=2, sort_keys=True)}


def peft_config(weights: dict[str, LoRAWeights]) -> dict:
    """The fields of the PEFT LoraConfig that define this adapter, named as diffusers' save_lora_weights names
    them (`transformer.r`, ...): the most common rank as r, the others in rank_pattern (diffusers'
    get_peft_kwargs does the same), alpha = rank everywhere because the scale is folded into the weights."""
    r = Counter(w.rank for w in weights.values()).most_common(1)[0][0]
    others = {path: w.rank for path, w in weights.items() if w.rank != r}
    config = {"peft_type": "LORA", "r": r, "lora_alpha": r, "rank_pattern": others, "alpha_pattern": dict(others),
              "target_modules": sorted(weights, key=natural_key), "bias": "none", "lora_bias": False, "lora_dropout": 0.0,
              "use_dora": False, "use_rslora": False, "fan_in_fan_out": False, "init_lora_weights": True}
    return {PEFT_COMPONENT + k: v for k, v in config.items()}


WRITERS: dict[str, Callable[[dict[str, LoRAWeights], Callable], tuple[dict, dict]]] = {
    "kohya": _kohya, "diffusers": _diffusers, "comfyui": _comfyui,
}
FORMATS = tuple(WRITERS)


def to_tensors(weights: dict[str, LoRAWeights], fmt: str, dtype: torch.dtype | None = None,
               names: tuple | None = None) -> tuple[dict, dict]:
    """{module path: LoRAWeights} -> (tensors, extra metadata) in `fmt`. `names`: the family's `lora_names()`;
    a family with a kohya-name table is written in kohya's layout only (its other formats would need the same
    renames, which neither ComfyUI nor diffusers needs: both read its kohya names)."""
    if fmt not in WRITERS:
        raise ConfigError(f"--save_format {fmt}: unknown; choose one of {', '.join(FORMATS)}.")
    cast = (lambda t: t.to(dtype).contiguous()) if dtype else (lambda t: t.contiguous())  # noqa: E731
    table = kohya_table(names[1]) if names else None
    if table is None:
        return WRITERS[fmt](weights, cast)
    if fmt != "kohya":
        raise ConfigError(f"--save_format {fmt}: this model's LoRAs are written in kohya naming only (ComfyUI and "
                          "diffusers both load it); use --save_format kohya.")
    unknown = sorted((p for p in weights if p not in table), key=natural_key)
    if unknown:
        raise ConfigError(f"{unknown[0]}: not a LoRA-able module of this model ({len(unknown)} such); it has no kohya name.")
    return _kohya(weights, cast, table)


def addnet_hashes(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> tuple[str, str]:
    """(sshs_model_hash, sshs_legacy_hash) as kohya's sd-scripts and musubi-tuner store them for
    sd-webui-additional-networks: sha256 of the tensor data, and the first 8 hex digits of sha256 of the
    64 KiB at offset 1 MiB, both of the file as it is with only its `ss_` metadata (so that editing the
    other metadata later does not change the hashes)."""
    data = memoryview(safetensors.torch.save(tensors, {k: v for k, v in metadata.items() if k.startswith("ss_")}))
    header = 8 + int.from_bytes(data[:8], "little")
    return hashlib.sha256(data[header:]).hexdigest(), hashlib.sha256(data[0x100000:0x110000]).hexdigest()[:8]


def read_lora_file(path: str | Path, block_modules: list[str], stem_modules: Sequence[str] | Mapping[str, str],
                   blocks: str) -> dict[str, LoRAWeights]:
    ckpt = open_checkpoint(path)
    tensors = {k: ckpt.read(k) for k in ckpt.keys()}
    if not tensors:
        raise ConfigError(f"{path}: empty LoRA file.")
    return parse_lora(tensors, ckpt.metadata, block_modules, stem_modules, blocks, str(path))


def write_lora_file(weights: dict[str, LoRAWeights], path: str | Path, fmt: str = "kohya",
                    metadata: dict[str, str] | None = None, dtype: torch.dtype | None = None,
                    names: tuple | None = None) -> None:
    """Every file gets the additional-networks hashes of exactly the tensors it holds. `names`: the family's
    `lora_names()` (needed where its kohya names are a table)."""
    tensors, extra = to_tensors(weights, fmt, dtype, names)
    meta = {**(metadata or {}), **extra}
    meta["sshs_model_hash"], meta["sshs_legacy_hash"] = addnet_hashes(tensors, meta)
    atomic_save_safetensors(tensors, path, meta)
