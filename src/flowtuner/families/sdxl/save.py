"""What `flowtuner finetune` saves of a trained SDXL UNet: one ldm single-file checkpoint (checkpoint.py's layout) with
the run's VAE and both text encoders beside the UNet, the file ComfyUI's checkpoint loader and A1111 read. A flow
model carries no marker (ComfyUI has none for SDXL): it is sampled through ModelSamplingSD3 (docs/sdxl.md). When
the run had no VAE or text encoders (a UNet-only --dit), the UNet alone is written, still in ldm names under
`model.diffusion_model.` (ComfyUI's "Load Diffusion Model" reads it)."""

from __future__ import annotations

import logging

import torch

from flowtuner.errors import WeightsError
from flowtuner.families.sdxl import keys as K
from flowtuner.families.sdxl.checkpoint import find_component, ldm_state

log = logging.getLogger(__name__)

#: prediction type -> ComfyUI's flag keys of a checkpoint trained for it (checkpoint.PREDICTION_MARKERS)
MARKERS = {"eps": (), "v": ("v_pred",), "flow": ()}


def _has(path, component: str) -> bool:
    if path is None:
        return False
    try:
        find_component(path, component)
    except WeightsError:  # a file without that component (a UNet-only --dit); unreadable files failed at load
        return False
    return True


def full_state(family, unet: torch.nn.Module, cfg, unet_state: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    from flowtuner.families.sdxl.text_models import load_text_encoders
    from flowtuner.families.sdxl.vae import load_vae

    paths = family.resolve_paths(dit=cfg.dit, vae=cfg.vae, text_encoder=cfg.text_encoder, tokenizer=cfg.tokenizer,
                                 model=cfg.model, comfyui_dir=cfg.comfyui_dir)
    if not (_has(paths.vae, "vae") and _has(paths.text_encoder, "clip_l") and _has(paths.text_encoder, "clip_g")):
        log.warning("no VAE / text encoders in this run's files: saving the UNet alone (ldm names)")
        table = K.unet_table(K.UNetLayout.from_config(unet.config))
        state = unet.state_dict() if unet_state is None else unet_state
        return {K.PREFIXES["unet"] + k: v for k, v in K.to_ldm_items(state.keys(), state.__getitem__, table, "unet")}
    vae = load_vae(paths.vae, "cpu")
    clip_l, clip_g = load_text_encoders(paths.text_encoder, "cpu")
    state = dict(ldm_state(unet, vae, clip_l, clip_g, unet_state))
    markers = MARKERS[family.prediction_type] + (("ztsnr",) if family.zsnr else ())
    return state | {m: torch.tensor([]) for m in markers}
