"""The text-encode node: a prompt and 0-3 IMAGE inputs -> ComfyUI CONDITIONING, encoded exactly as `flowtuner
generate` encodes it (the family's own TextEncoder: templates, dropped prefix, the VL image sizes, vision tokens in
raster order; see families/qwen_image/text_encoder.py and edit_text.py).

The output is what ComfyUI's own Qwen text-encode nodes emit, so ComfyUI's KSampler with ComfyUI's Qwen model
takes it: `[[embeds [1, L, D], {"pooled_output": None, "reference_latents": [...]}]]`. Reference latents (edit
models, when a VAE is connected) are in ComfyUI's latent format: the raw VAE latents `[1, 16, 1, h, w]` that
ComfyUI's own VAEEncode gives and its Qwen model normalises (`process_latent_in`). flowtuner's normalised copies
ride along under FLOWTUNER_REFERENCES, paired with the raw tensors by identity, so the flowtuner Sampler uses the
exact latents `flowtuner generate` uses instead of a normalise(denormalise(z)) round trip; a raw tensor that is
not one of ours (ComfyUI's encode nodes, or a list another node rebuilt) is normalised as ComfyUI does.
"""

from __future__ import annotations

import numpy as np
import torch

from flowtuner.errors import ConfigError

#: ComfyUI's Wan21 latent format = diffusers' AutoencoderKLQwenImage config (reference qwen-image.md §8)
LATENT_MEAN = (-0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
               0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921)
LATENT_STD = (2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
              3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160)
#: ComfyUI's conditioning key for an edit model's reference latents (comfy/model_base.py QwenImage.extra_conds)
REFERENCE_KEY = "reference_latents"
#: flowtuner's (raw, normalised) pairs of the reference latents it encoded
FLOWTUNER_REFERENCES = "flowtuner_reference_latents"
IMAGE_INPUTS = ("image1", "image2", "image3")
TYPES = {"text_encoder": "FLOWTUNER_TEXT_ENCODER", "vae": "VAE"}


def _stats(latent: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    shape = (1, len(LATENT_MEAN)) + (1,) * (latent.dim() - 2)
    mean = torch.tensor(LATENT_MEAN).view(shape).to(latent.device, latent.dtype)
    std = torch.tensor(LATENT_STD).view(shape).to(latent.device, latent.dtype)
    return mean, std


def to_comfy_latent(latent: torch.Tensor) -> torch.Tensor:
    """flowtuner's normalised latents -> ComfyUI's (raw VAE) latents, with Wan21.process_out's arithmetic."""
    mean, std = _stats(latent)
    return latent * std / 1.0 + mean


def from_comfy_latent(latent: torch.Tensor) -> torch.Tensor:
    """ComfyUI's raw latents -> flowtuner's normalised ones, with Wan21.process_in's arithmetic."""
    mean, std = _stats(latent)
    return (latent - mean) * 1.0 / std


def to_pil(image: torch.Tensor, name: str):
    """One ComfyUI IMAGE ([B, H, W, C] floats in [0, 1]) -> a PIL RGB image. 8-bit quantisation is exact for what
    LoadImage gives (x / 255), so a loaded file reaches the encoder as `flowtuner generate` reads it."""
    from PIL import Image

    if image.dim() != 4:
        raise ConfigError(f"{name}: expected an IMAGE [batch, height, width, channels], got shape {tuple(image.shape)}.")
    if image.shape[0] != 1:
        raise ConfigError(f"{name}: a batch of {image.shape[0]} images; the edit models read one image per input: "
                          "connect one image to each of image1..image3.")
    if image.shape[-1] != 3:
        what = "has an alpha channel (4 channels)" if image.shape[-1] == 4 else f"has {image.shape[-1]} channels"
        raise ConfigError(f"{name} {what}: the edit models read RGB; drop the alpha first (e.g. load the image "
                          "without it, or composite it onto a background).")
    pixels = (image[0].float().clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()
    return Image.fromarray(np.ascontiguousarray(pixels), "RGB")


VERSIONS = ("original", "edit", "edit-2509", "edit-2511")


def family_of(version: str):
    from flowtuner.families import VERSIONS as ALL, get_family

    if version not in VERSIONS:
        raise ConfigError(f"model_version {version}: choose one of {', '.join(VERSIONS)}.")
    return get_family(ALL[version].family)


def loaded_encoder(text_encoder, family):
    """The family's flowtuner TextEncoder from the loader's FLOWTUNER_TEXT_ENCODER (or one passed as it is)."""
    return text_encoder if hasattr(text_encoder, "encode") else text_encoder.encoder(family)


def references(pils: list, vae, version: str) -> tuple[list, list]:
    """(raw latents for ComfyUI, [(raw, normalised)] pairs) of the control images at the version's VAE size.
    flowtuner's VAE (the flowtuner VAE loader: `.codec`) encodes exactly as `flowtuner generate`; any other
    ComfyUI VAE gets the same resized pixels through its own encode."""
    from flowtuner.families.qwen_image.edit import control_pixels, reference_latents
    from flowtuner.families.qwen_image.edit_sizes import vae_size

    codec = getattr(vae, "codec", None)
    if codec is not None:
        pairs = [(to_comfy_latent(r), r) for r in reference_latents(pils, codec, version)]
        return [raw for raw, _ in pairs], pairs
    raw = [vae.encode(control_pixels(im, *vae_size(version, *im.size)).movedim(1, -1)) for im in pils]
    return [r if r.dim() == 5 else r.unsqueeze(2) for r in raw], []


def encode(text_encoder, version: str, prompt: str, images: list[torch.Tensor | None], vae=None) -> list:
    """The node's work -> ComfyUI CONDITIONING."""
    family = family_of(version)
    given = [(name, im) for name, im in zip(IMAGE_INPUTS, images) if im is not None]
    pils = [to_pil(im, name) for name, im in given]
    if pils and version == "original":
        raise ConfigError(f"{', '.join(n for n, _ in given)} connected, but model_version is original (Qwen-Image reads "
                          "text only): choose the edit version (edit, edit-2509, edit-2511).")
    if version != "original":
        if not pils:
            raise ConfigError(f"model_version {version}: connect image1 (and image2, image3 for 2509 / 2511), or "
                              "choose original for text only.")
        family.check_controls(len(pils))
    encoder = loaded_encoder(text_encoder, family)
    (cond,) = encoder.encode([prompt], [pils]) if pils else encoder.encode([prompt])
    extra: dict = {"pooled_output": None}
    if cond.mask is not None and not bool(cond.mask.all()):  # ComfyUI drops an all-ones mask as well
        extra["attention_mask"] = cond.mask
    if pils and vae is not None:
        extra[REFERENCE_KEY], pairs = references(pils, vae, version)
        if pairs:
            extra[FLOWTUNER_REFERENCES] = pairs
    return [[cond.embeds, extra]]


def normalised_references(entry: dict) -> list[torch.Tensor] | None:
    """The entry's reference latents in flowtuner's normalised form: ours exactly, anyone else's via process_in."""
    raw = entry.get(REFERENCE_KEY)
    if raw is None:
        return None
    ours = {id(r): n for r, n in entry.get(FLOWTUNER_REFERENCES) or [] if any(r is lat for lat in raw)}
    return [ours[id(lat)] if id(lat) in ours else from_comfy_latent(lat) for lat in raw]


class TextEncode:
    """flowtuner Text Encode (Qwen-Image / Edit)."""

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "text_encoder": (TYPES["text_encoder"], {"tooltip": "flowtuner's text encoder (flowtuner Text Encoder "
                                                                    "Loader); its model version picks the template"}),
                "prompt": ("STRING", {"multiline": True, "dynamic_prompts": True}),
                "model_version": (VERSIONS, {"default": "original", "tooltip": "the model the conditioning is for: its "
                                             "template and image sizes (use the DiT loader's version)"}),
            },
            "optional": {
                "vae": (TYPES["vae"], {"tooltip": "edit models: encodes the images into the reference latents the DiT "
                                                  "reads (flowtuner VAE loader: exactly as flowtuner generate; without "
                                                  "it, only the text encoder sees the images)"}),
                **{name: ("IMAGE", {"tooltip": "edit models: control image (Edit v1: image1 only; 2509 / 2511: 1-3)"})
                   for name in IMAGE_INPUTS},
            },
        }

    RETURN_TYPES = ("CONDITIONING",)
    FUNCTION = "run"
    CATEGORY = "flowtuner"
    DESCRIPTION = ("Encodes a prompt (and an edit model's control images) exactly as `flowtuner generate` and "
                   "diffusers do; the CONDITIONING also works with ComfyUI's KSampler and Qwen model.")

    def run(self, text_encoder, prompt, model_version="original", vae=None, image1=None, image2=None, image3=None):
        # flowtuner's errors are Exceptions whose str is the one line ComfyUI's error box shows
        return (encode(text_encoder, model_version, prompt, [image1, image2, image3], vae),)


NODES = {"flowtunerTextEncode": TextEncode}
DISPLAY = {"flowtunerTextEncode": "flowtuner Text Encode (Qwen-Image / Edit)"}
