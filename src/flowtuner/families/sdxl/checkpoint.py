"""Where an SDXL component's weights are, in every layout users have, and the single-file writer.

Layouts read: a single-file checkpoint (A1111 / civitai / ComfyUI `checkpoints/`: ldm / sgm names under
`model.diffusion_model.`, `first_stage_model.`, `conditioner.embedders.0|1.`), a diffusers folder (unet/, vae/,
text_encoder/, text_encoder_2/ with config.json), one component's folder, and standalone files (a UNet with or
without `model.diffusion_model.`, in ldm or diffusers names; `sdxl_vae.safetensors` with bare ldm VAE names;
ComfyUI's `clip_l` / `clip_g` text encoder files)."""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from flowtuner.errors import WeightsError
from flowtuner.families.identify import describe
from flowtuner.families.sdxl import keys as K
from flowtuner.weights.materialize import check_supported_quantisation, is_auxiliary, read_dequantized, storage_dtype
from flowtuner.weights.reader import Checkpoint, open_checkpoint
from flowtuner.weights.writer import stream_save_safetensors

# component -> its sub-folder in a diffusers StableDiffusionXLPipeline folder
FOLDERS = {"unet": "unet", "vae": "vae", "clip_l": "text_encoder", "clip_g": "text_encoder_2"}
WHAT = {"unet": "an SDXL UNet", "vae": "an SDXL VAE", "clip_l": "an SDXL CLIP-L text encoder",
        "clip_g": "an SDXL OpenCLIP-bigG text encoder"}
# a diffusers component folder may hold the weights twice (full precision and a `.fp16` variant): first found wins
WEIGHT_FILES = ("diffusion_pytorch_model.safetensors", "model.safetensors",
                "diffusion_pytorch_model.fp16.safetensors", "model.fp16.safetensors")
# ComfyUI's flag keys for the prediction type a checkpoint was trained for (comfy/supported_models.py SDXL)
PREDICTION_MARKERS = ("v_pred", "ztsnr")


@dataclass(frozen=True)
class Layout:
    prefix: str
    probes: tuple[str, ...]  # keys (after the prefix) that all exist in this layout
    names: str  # "ldm" or "diffusers"


# First match wins. The ldm layouts come first: a whole checkpoint also holds a component's bare-named keys nowhere.
LAYOUTS: dict[str, tuple[Layout, ...]] = {
    "unet": (
        Layout(K.PREFIXES["unet"], ("input_blocks.0.0.weight",), "ldm"),
        Layout("", ("input_blocks.0.0.weight",), "ldm"),
        Layout("", ("conv_in.weight", "time_embedding.linear_1.weight"), "diffusers"),
    ),
    "vae": (
        Layout(K.PREFIXES["vae"], ("encoder.down.0.block.0.conv1.weight",), "ldm"),
        Layout("vae.", ("encoder.down.0.block.0.conv1.weight",), "ldm"),
        Layout("", ("encoder.down.0.block.0.conv1.weight",), "ldm"),
        Layout("", ("encoder.down_blocks.0.resnets.0.conv1.weight", "decoder.conv_norm_out.weight"), "diffusers"),
    ),
    "clip_l": (
        Layout(K.PREFIXES["clip_l"], ("text_model.embeddings.token_embedding.weight",), "ldm"),
        Layout("", ("text_model.embeddings.token_embedding.weight",), "diffusers"),
        Layout("", ("embeddings.token_embedding.weight",), "diffusers"),
    ),
    "clip_g": (
        Layout(K.PREFIXES["clip_g"], ("token_embedding.weight",), "ldm"),
        Layout("", ("token_embedding.weight", "transformer.resblocks.0.attn.in_proj_weight"), "ldm"),
        Layout("", ("text_model.embeddings.token_embedding.weight", "text_projection.weight"), "diffusers"),
    ),
}


@dataclass
class Source:
    """One component's tensors (prefix removed), the names they use, and a diffusers config.json if one came along."""

    ckpt: Checkpoint
    names: str
    config: dict | None

    def keys(self) -> list[str]:
        return [k for k in self.ckpt.keys() if not is_auxiliary(k)]

    def reader(self, dtype: torch.dtype | None):
        return lambda key: read_dequantized(self.ckpt, key, dtype or self.ckpt.dtype(key))

    def dtype(self, probe: str) -> torch.dtype:
        return storage_dtype(self.ckpt, probe)


def _component_folder(path: Path, component: str) -> Path | None:
    """The folder holding one component's weights, when `path` is a diffusers pipeline or component folder."""
    if not path.is_dir():
        return None
    sub = path / FOLDERS[component]
    return sub if sub.is_dir() else path


def _open_folder(folder: Path) -> Checkpoint:
    if any(folder.glob("*.safetensors.index.json")):
        return open_checkpoint(folder)
    for name in WEIGHT_FILES:
        if (folder / name).is_file():
            return open_checkpoint(folder / name)
    return open_checkpoint(folder)  # its own one-line error for other contents


def _config(folder: Path | None) -> dict | None:
    file = folder / "config.json" if folder else None
    if not file or not file.is_file():
        return None
    try:
        return json.loads(file.read_text())
    except json.JSONDecodeError:
        raise WeightsError(f"{file}: not valid JSON; repair it or remove it to infer the model from its weights.") from None


def find_component(path: str | Path, component: str) -> Source:
    path = Path(path)
    folder = _component_folder(path, component)
    ckpt = _open_folder(folder) if folder else open_checkpoint(path)
    check_supported_quantisation(ckpt)
    for layout in LAYOUTS[component]:
        if all(layout.prefix + p in ckpt for p in layout.probes):
            return Source(ckpt.select(layout.prefix), layout.names, _config(folder))
    raise WeightsError(f"{ckpt.path}: expected {WHAT[component]}, but this looks like {describe(ckpt)}.")


def prediction_markers(path: str | Path) -> tuple[str, ...]:
    """ComfyUI's `v_pred` / `ztsnr` flag keys in a single-file checkpoint."""
    path = Path(path)
    if path.is_dir():
        return ()
    ckpt = open_checkpoint(path)
    return tuple(m for m in PREDICTION_MARKERS if m in ckpt)


# ---- writing ----------------------------------------------------------------------------------------------------

def ldm_state(unet, vae, clip_l, clip_g, unet_state=None) -> Iterator[tuple[str, torch.Tensor]]:
    """(single-file key, tensor) for the four components, views of their weights wherever the layouts agree;
    `unet_state`: the UNet's state dict when gathered elsewhere (FSDP)."""
    from flowtuner.families.sdxl.text_models import canonical_clip_state

    parts = (
        ("unet", unet.state_dict() if unet_state is None else unet_state, K.unet_table(K.UNetLayout.from_config(unet.config))),
        ("vae", vae.state_dict(), K.vae_table(K.VAELayout.from_config(vae.config))),
        ("clip_l", canonical_clip_state(clip_l), K.clip_l_table()),
        ("clip_g", canonical_clip_state(clip_g), K.clip_g_table(clip_g.config.num_hidden_layers)),
    )
    for component, state, table in parts:
        for key, value in K.to_ldm_items(state.keys(), state.__getitem__, table, component):
            yield K.PREFIXES[component] + key, value
    # as in the released checkpoints and ComfyUI's own saves (a buffer transformers rebuilds on load)
    positions = clip_l.config.max_position_embeddings
    yield K.PREFIXES["clip_l"] + K.DROPPED["clip_l"][0], torch.arange(positions).unsqueeze(0)


def save_checkpoint(path: str | Path, unet, vae, clip_l, clip_g, metadata: dict[str, str] | None = None,
                    dtype: torch.dtype | None = None, markers: Iterable[str] = (),
                    extra: dict[str, torch.Tensor] | None = None) -> Path:
    """Write the four components as one ldm single-file checkpoint (atomically; float tensors cast to `dtype` one
    at a time when given). `markers`: ComfyUI's prediction-type flag keys (`v_pred`, `ztsnr`) to include."""
    unknown = [m for m in markers if m not in PREDICTION_MARKERS]
    if unknown:
        raise ValueError(f"unknown prediction marker {unknown[0]!r}; known: {', '.join(PREDICTION_MARKERS)}")
    tensors = dict(ldm_state(unet, vae, clip_l, clip_g))
    for marker in markers:
        tensors[marker] = torch.tensor([])
    tensors.update(extra or {})
    path = Path(path)
    stream_save_safetensors(tensors, path, metadata={k: str(v) for k, v in (metadata or {}).items()}, dtype=dtype)
    return path
