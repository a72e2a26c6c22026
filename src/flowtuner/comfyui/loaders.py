"""Loader nodes: the DiT, the text encoder and the VAE, picked from ComfyUI's model folders.

Dropdowns list what `folder_paths` knows (diffusion_models + unet, text_encoders + clip, vae) plus folders:
a Hugging Face / diffusers component folder inside one of those (an entry "NAME/"), and each diffusers repo
under models/diffusers that has the component (an entry "diffusers/REPO"). The shard files inside a listed
folder are not listed on their own.

The loaders check the files as the CLI does (same one-line errors, shown in ComfyUI's error box) and resolve the
model version, but the weights load when a node first needs them (`FlowtunerModel.denoiser`,
`FlowtunerTextEncoder.encoder`): the text encoder and the DiT then never have to be in memory together. One
loaded DiT and one loaded text encoder are kept between runs (the last used); asking for another recipe
replaces it.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from flowtuner.errors import ConfigError, FlowtunerError

log = logging.getLogger(__name__)

CATEGORY = "flowtuner/loaders"
DIFFUSERS_PREFIX = "diffusers/"
VERSION_CHOICES = ("auto", "original", "edit", "edit-2509", "edit-2511")
# weight_dtype widget -> (fp8_base, fp8_scaled), flowtuner's --fp8_base / --fp8_scaled
WEIGHT_DTYPES = {"default": (False, False), "fp8_e4m3fn": (True, False), "fp8_scaled": (True, True)}
# ComfyUI folder kind -> the component subfolder of a diffusers repo
KINDS = {"diffusion_models": "transformer", "text_encoders": "text_encoder", "vae": "vae"}


class NodeError(Exception):
    """What ComfyUI's error box shows: str() is flowtuner's one line."""


def node_errors(fn):
    """flowtuner's user errors reach ComfyUI as one line (its box shows str(exception)), never a traceback dump."""
    import functools

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except FlowtunerError as exc:
            raise NodeError(str(exc)) from None

    return wrapper


# -- listing ComfyUI's folders ---------------------------------------------------------------------------------

def _folder_entries(kind: str) -> tuple[list[str], set[str]]:
    """HF-style folders (with config.json) directly inside a ComfyUI folder of `kind`, and their names."""
    import folder_paths

    names = set()
    for root in folder_paths.get_folder_paths(kind):
        if os.path.isdir(root):
            names.update(e.name for e in os.scandir(root) if e.is_dir() and os.path.isfile(os.path.join(e.path, "config.json")))
    return sorted(f"{n}/" for n in names), names


def _diffusers_repos(component: str) -> list[str]:
    import folder_paths

    repos = set()
    for root in folder_paths.get_folder_paths("diffusers"):
        if os.path.isdir(root):
            repos.update(e.name for e in os.scandir(root) if e.is_dir() and os.path.isdir(os.path.join(e.path, component)))
    return sorted(DIFFUSERS_PREFIX + r for r in repos)


def choices(kind: str) -> list[str]:
    """The dropdown of a loader: ComfyUI's files of `kind`, its component folders, the diffusers repos."""
    import folder_paths

    folders, names = _folder_entries(kind)
    files = [f for f in folder_paths.get_filename_list(kind) if f.replace("\\", "/").split("/")[0] not in names]
    return files + folders + _diffusers_repos(KINDS[kind])


def resolve(kind: str, name: str) -> Path:
    """A dropdown entry -> the file or folder it names; an unknown entry is a one-line error."""
    import folder_paths

    if name.startswith(DIFFUSERS_PREFIX):
        for root in folder_paths.get_folder_paths("diffusers"):
            path = Path(root) / name[len(DIFFUSERS_PREFIX):] / KINDS[kind]
            if path.is_dir():
                return path
    elif name.endswith("/"):
        for root in folder_paths.get_folder_paths(kind):
            path = Path(root) / name.rstrip("/")
            if path.is_dir():
                return path
    else:
        full = folder_paths.get_full_path(kind, name)
        if full is not None:
            return Path(full)
    where = ", ".join(folder_paths.get_folder_paths(kind if not name.startswith(DIFFUSERS_PREFIX) else "diffusers"))
    raise ConfigError(f"{name}: not found in ComfyUI's {kind} folders ({where}); put the file there and refresh.")


def comfyui_install_dir() -> Path:
    """The ComfyUI install (the folder of folder_paths.py): where its bundled Qwen tokenizer lives."""
    import folder_paths

    return Path(folder_paths.__file__).resolve().parent


def default_device():
    import comfy.model_management

    return comfy.model_management.get_torch_device()


def _free_comfy_memory(device) -> None:
    """ComfyUI's own models leave the accelerator before a flowtuner model moves onto it."""
    if getattr(device, "type", str(device)) == "cpu":
        return
    import comfy.model_management

    comfy.model_management.unload_all_models()
    comfy.model_management.soft_empty_cache()


# -- the one-slot caches of loaded models ----------------------------------------------------------------------

class _Slot:
    """One loaded model kept between runs; another key replaces it."""

    def __init__(self):
        self.key, self.value, self.lock = None, None, threading.Lock()

    def get(self, key, build):
        with self.lock:
            if self.key != key:
                self.key, self.value = None, None  # drop the old one before the new one loads
                self.value, self.key = build(), key
            return self.value

    def clear(self) -> None:
        with self.lock:
            self.key, self.value = None, None


SLOTS = {"dit": _Slot(), "text_encoder": _Slot()}


def release(slot: str) -> None:
    """Free a kept model ("dit" or "text_encoder"), e.g. the text encoder before the DiT loads."""
    SLOTS[slot].clear()
    from flowtuner.generate import release_cache

    release_cache()


# -- the objects on the sockets --------------------------------------------------------------------------------

@dataclass(frozen=True)
class FlowtunerModel:
    """FLOWTUNER_MODEL: a DiT recipe (files, version, fp8, LoRAs), loaded on demand."""

    family: Any = field(compare=False)
    version: str
    paths: Any = field(compare=False)
    fp8: bool = False
    fp8_scaled: bool = False
    loras: tuple[tuple[str, float], ...] = ()

    @property
    def key(self) -> tuple:
        return (str(self.paths.dit), self.version, self.fp8, self.fp8_scaled, self.loras)

    def with_loras(self, loras) -> FlowtunerModel:
        return dataclasses.replace(self, loras=self.loras + tuple((str(f), float(m)) for f, m in loras))

    def denoiser(self, device=None, attn_mode: str = "torch"):
        """The loaded flowtuner Denoiser (LoRAs applied as `flowtuner generate` does), kept until another recipe
        is asked for."""
        device = device if device is not None else default_device()
        return SLOTS["dit"].get((self.key, str(device), attn_mode), lambda: self._load(device, attn_mode))

    @node_errors
    def _load(self, device, attn_mode: str):
        from flowtuner.generate import load_denoiser_with_loras
        from flowtuner.weights.fp8 import fp8_scaled

        _free_comfy_memory(device)
        with fp8_scaled(self.fp8_scaled):
            return load_denoiser_with_loras(self.family, self.paths, device, attn_mode, list(self.loras), self.fp8)


@dataclass(frozen=True)
class FlowtunerTextEncoder:
    """FLOWTUNER_TEXT_ENCODER: Qwen2.5-VL files and a tokenizer found offline, loaded on demand per family."""

    paths: Any = field(compare=False)
    key: str = ""

    def encoder(self, family, device=None):
        device = device if device is not None else default_device()
        return SLOTS["text_encoder"].get((self.key, family.name, getattr(family, "version", None), str(device)),
                                         node_errors(lambda: self._load(family, device)))

    def _load(self, family, device):
        _free_comfy_memory(device)
        return family.load_text_encoder(self.paths, device)


def _comfy_vae_base():
    import comfy.sd

    return comfy.sd.VAE


def make_vae(codec, source: str):
    """A ComfyUI VAE backed by flowtuner's codec: ComfyUI's VAE nodes call decode / encode and read a few
    attributes; comfy.sd.VAE's own constructor (which builds ComfyUI's model from a state dict) is not run."""
    base = _comfy_vae_base()

    class FlowtunerVAE(base):
        def __init__(self, codec, source: str):  # noqa: D401 - deliberately not calling base.__init__
            self.codec, self.source = codec, source
            self.latent_channels, self.latent_dim, self.output_channels = 16, 3, 3
            self.downscale_ratio = self.upscale_ratio = 8
            self.downscale_index_formula = self.upscale_index_formula = None
            self.crop_input, self.pad_channel_value = True, None
            self.disable_offload = False
            self.extra_1d_channel = None
            self.working_dtypes = [next(codec.vae.parameters()).dtype]
            self.device = self.output_device = next(codec.vae.parameters()).device
            self.vae_dtype = self.working_dtypes[0]
            self.patcher = None
            self.first_stage_model = codec.vae

        def to_raw(self, normalised):
            return normalised * self.codec.std.to(normalised) + self.codec.mean.to(normalised)

        def to_normalised(self, raw):
            return (raw - self.codec.mean.to(raw)) / self.codec.std.to(raw)

        def throw_exception_if_invalid(self):
            return None

        def decode(self, samples_in, vae_options={}):  # noqa: B006 - ComfyUI's signature
            raw = samples_in if samples_in.ndim == 5 else samples_in.unsqueeze(2)
            images = self.codec.decode(self.to_normalised(raw.float()))  # [B, 3, H, W] in [0, 1]
            return images.permute(0, 2, 3, 1).float()

        def decode_tiled(self, samples, *args, **kwargs):
            return self.decode(samples)

        def encode(self, pixel_samples):
            pixels = pixel_samples[..., :3].movedim(-1, 1)
            return self.to_raw(self.codec.encode(pixels.float()).float()).cpu()

        def encode_tiled(self, pixel_samples, *args, **kwargs):
            return self.encode(pixel_samples)

        def spacial_compression_decode(self):
            return 8

        def spacial_compression_encode(self):
            return 8

        def temporal_compression_decode(self):
            return None

        def get_sd(self):
            return self.codec.vae.state_dict()

        def memory_used_decode(self, shape, dtype):
            return 0

        def memory_used_encode(self, shape, dtype):
            return 0

    return FlowtunerVAE(codec, source)


# -- nodes -----------------------------------------------------------------------------------------------------

def _qwen_family(version: str):
    from flowtuner.families import VERSIONS, get_family

    return get_family(VERSIONS[version].family)


def resolve_version(dit: Path, chosen: str) -> str:
    """auto: what the files say (as the CLI detects it), else original; a choice the files contradict: the
    CLI's one-line error."""
    from flowtuner.config.models import resolve_model_version

    cfg = SimpleNamespace(dit=str(dit), model=None, model_version=None if chosen == "auto" else chosen,
                          edit=False, edit_plus=False)
    version = resolve_model_version(cfg)
    if version not in VERSION_CHOICES:
        raise ConfigError(f"{dit}: a {version} model; this loader runs Qwen-Image DiTs "
                          f"({', '.join(VERSION_CHOICES[1:])}).")
    return version


def _model_paths(**slots):
    from flowtuner.families.base import ModelPaths

    return ModelPaths(comfyui_dir=comfyui_install_dir(), **slots)


class DiTLoader:
    DESCRIPTION = ("Loads a Qwen-Image DiT (bf16, fp8 or fp8_scaled files, or a diffusers transformer folder) for "
                   "flowtuner's nodes. The file is checked now; the weights load when the sampler first runs.")
    CATEGORY = CATEGORY
    RETURN_TYPES = ("FLOWTUNER_MODEL",)
    RETURN_NAMES = ("model",)
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "dit_name": (choices("diffusion_models"), {"tooltip": "from models/diffusion_models, models/unet and models/diffusers"}),
            "weight_dtype": (list(WEIGHT_DTYPES), {"tooltip": "default: as stored; fp8_e4m3fn: flowtuner's --fp8_base; "
                                                              "fp8_scaled: --fp8_scaled (fp8 files keep their values)"}),
            "model_version": (list(VERSION_CHOICES), {"tooltip": "auto: as the files say (a diffusers folder's config), else original"}),
        }}

    @node_errors
    def load(self, dit_name: str, weight_dtype: str = "default", model_version: str = "auto"):
        if weight_dtype not in WEIGHT_DTYPES:
            raise ConfigError(f"weight_dtype {weight_dtype}: choose one of {', '.join(WEIGHT_DTYPES)}.")
        dit = resolve("diffusion_models", dit_name)
        version = resolve_version(dit, model_version)
        family = _qwen_family(version)
        paths = _model_paths(dit=dit)
        family.validate(paths, ("dit",))
        fp8, scaled = WEIGHT_DTYPES[weight_dtype]
        return (FlowtunerModel(family, version, paths, fp8, scaled),)


class TextEncoderLoader:
    DESCRIPTION = ("Loads Qwen2.5-VL for flowtuner's text encoding: ComfyUI's single file (qwen_2.5_vl_7b*.safetensors) "
                   "or a Hugging Face folder. The tokenizer is found offline as the CLI finds it (beside the files, "
                   "the Hugging Face cache, ComfyUI's bundled qwen25_tokenizer).")
    CATEGORY = CATEGORY
    RETURN_TYPES = ("FLOWTUNER_TEXT_ENCODER",)
    RETURN_NAMES = ("text_encoder",)
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "text_encoder_name": (choices("text_encoders"), {"tooltip": "from models/text_encoders, models/clip and models/diffusers"}),
        }}

    @node_errors
    def load(self, text_encoder_name: str):
        from flowtuner.families.qwen_image.tokenizer import load_tokenizer

        te = resolve("text_encoders", text_encoder_name)
        paths = _model_paths(text_encoder=te, model_root=te.parent if text_encoder_name.startswith(DIFFUSERS_PREFIX) else None)
        _qwen_family("original").validate(paths, ("text_encoder",))
        near = [p for p in (te, paths.model_root) if p is not None]
        load_tokenizer(None, near, paths.comfyui_dir)  # now, so that a missing tokenizer shows at this node
        return (FlowtunerTextEncoder(paths, f"{te}:{te.stat().st_mtime_ns}"),)


class VAELoader:
    DESCRIPTION = ("Loads the Qwen-Image VAE (diffusers or Wan 2.1 layout, file or folder) with flowtuner's code, as "
                   "a ComfyUI VAE: ComfyUI's VAE Decode / VAE Encode take it, and so do flowtuner's nodes.")
    CATEGORY = CATEGORY
    RETURN_TYPES = ("VAE",)
    RETURN_NAMES = ("vae",)
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "vae_name": (choices("vae"), {"tooltip": "from models/vae and models/diffusers"}),
        }}

    @node_errors
    def load(self, vae_name: str):
        family = _qwen_family("original")
        vae = resolve("vae", vae_name)
        paths = _model_paths(vae=vae)
        family.validate(paths, ("vae",))
        # the VAE is small (~250 MB): loaded on the CPU now, which ComfyUI's VAE nodes then use
        return (make_vae(family.load_codec(paths, "cpu"), str(vae)),)


NODES = {
    "flowtunerDiTLoader": DiTLoader,
    "flowtunerTextEncoderLoader": TextEncoderLoader,
    "flowtunerVAELoader": VAELoader,
}
DISPLAY = {
    "flowtunerDiTLoader": "flowtuner DiT loader (Qwen-Image)",
    "flowtunerTextEncoderLoader": "flowtuner text encoder loader (Qwen2.5-VL)",
    "flowtunerVAELoader": "flowtuner VAE loader (Qwen-Image)",
}
