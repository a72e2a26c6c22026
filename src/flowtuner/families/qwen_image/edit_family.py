"""The Qwen-Image-Edit family (v1, 2509, 2511): Qwen-Image's adapter with control images read by the text
encoder (edit_text.py) and given to the DiT as reference latents (edit.py). One class, one object per version."""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from flowtuner.errors import ConfigError
from flowtuner.families.base import Conditioning, ImageCodec, ModelPaths
from flowtuner.families.paths import require
from flowtuner.families.qwen_image.dit import load_dit
from flowtuner.families.qwen_image.edit import QwenImageEditDenoiser, reference_latents, with_references
from flowtuner.families.qwen_image.edit_sizes import (
    IMAGE_COUNTS, check_image_count, default_output_size, musubi_control_sizes, vl_size,
)
from flowtuner.families.qwen_image.edit_text import QwenEditTextEncoder, cover_crop, text_recipe
from flowtuner.families.qwen_image.family import QwenImageFamily, set_attention
from flowtuner.families.qwen_image.tokenizer import load_tokenizer
from flowtuner.families.qwen_image.vision import load_vl_model, vision_view
from flowtuner.weights.reader import open_checkpoint

# musubi-tuner's latent-cache names of the control latents (without the dtype suffix): latents_control_{i}_1x{h}x{w}
CONTROL_NAME = re.compile(r"^latents_control_(\d+)_\d+x\d+x\d+$")

# --model_version -> modelspec architecture as musubi-tuner writes it
MODELSPEC = {"edit": "Qwen-Image-Edit", "edit-2509": "Qwen-Image-Edit-Plus", "edit-2511": "Qwen-Image-Edit-2511"}


def processor_config(paths: ModelPaths) -> dict | None:
    """The VL image processor's config beside the model files: a diffusers repo's processor/, or a Hugging Face
    Qwen2.5-VL folder given as the text encoder. None: the released models' values (edit_text.py)."""
    te = Path(paths.text_encoder) if paths.text_encoder else None
    repo = te if te is None or te.is_dir() else te.parent  # the text encoder's folder
    candidates = [paths.model_root and Path(paths.model_root) / "processor", repo, repo and repo.parent / "processor"]
    for folder in filter(None, candidates):
        file = folder / "preprocessor_config.json"
        if file.is_file():
            return json.loads(file.read_text())
    return None


class QwenImageEditFamily(QwenImageFamily):
    name = "qwen_image_edit"
    cache_arch = "qie"  # musubi-tuner: one suffix for the three versions (text caches record the version)
    base_model_version = "qwen_image_edit"  # musubi-tuner's LoRA metadata; its caches keep "qwen_image"
    modelspec_resolution = "1024x1024"

    def __init__(self, version: str):
        self.version = version
        self.max_controls = IMAGE_COUNTS[version][1]
        self.modelspec_architecture = MODELSPEC[version]
        self.control_rule = "diffusers"

    def plan_spec(self, paths):
        # the reference latents' tokens join the sequence: the plan would have to model the control images
        raise ConfigError(f"flowtuner plan: planning {self.modelspec_architecture} is not available yet; plan "
                          "--model_version original for the text-to-image cost.")

    def configure(self, cfg) -> None:
        """musubi-tuner's --resize_control_to_official_size (wins, as in musubi) / --resize_control_to_image_size;
        without them control images are sized as diffusers' pipelines size them."""
        if getattr(cfg, "resize_control_to_official_size", False):
            self.control_rule = "official"
        elif getattr(cfg, "resize_control_to_image_size", False):
            self.control_rule = "image"

    def control_key(self, job) -> tuple:
        if self.control_rule == "image":
            return ("image", job.width, job.height)
        return (self.control_rule,) if self.control_rule != "diffusers" else ()

    def control_sizes(self, images: list, key: tuple) -> tuple[list | None, list | None]:
        if not key:
            return None, None
        if key[0] == "image":
            # The VAE image at the output size, as musubi-tuner; the text encoder's image at the version's size for
            # that shape (musubi-tuner gives it the output-size image). This is what flowtuner's training caches
            # hold for a control resized to the target's bucket, so a model sees at inference what it was trained on.
            output = (key[1], key[2])
            return [vl_size(self.version, *output)] * len(images), [output] * len(images)
        pairs = [musubi_control_sizes(*im.size, (0, 0), True, False) for im in images]
        return [vl for _, vl in pairs], [vae for vae, _ in pairs]

    def text_recipe(self) -> str:
        return text_recipe(self.version)  # a v1 text cache is stale for 2509

    def validate(self, paths: ModelPaths, slots: tuple[str, ...]) -> None:
        super().validate(paths, slots)
        if "text_encoder" in slots:  # edit models read the control images with the VL model's vision tower
            vision_view(open_checkpoint(require(paths, "text_encoder")))

    def load_text_encoder(self, paths: ModelPaths, device: torch.device) -> QwenEditTextEncoder:
        te_path = require(paths, "text_encoder")
        near = [p for p in (te_path, paths.model_root, paths.dit) if p is not None]
        tokenizer = load_tokenizer(paths.tokenizer, [Path(p) for p in near], paths.comfyui_dir)
        return QwenEditTextEncoder(load_vl_model(te_path, device), tokenizer, self.version, processor_config(paths))

    def load_denoiser(self, paths: ModelPaths, device: torch.device, attn_mode: str = "torch") -> QwenImageEditDenoiser:
        dit, info = load_dit(require(paths, "dit"), device)
        set_attention(dit, attn_mode)
        return QwenImageEditDenoiser(dit, info, self.version)

    def check_controls(self, count: int) -> None:
        check_image_count(self.version, count)

    def control_conditioning(self, cond: Conditioning, images: list, codec: ImageCodec, key: tuple = ()) -> Conditioning:
        _, vae_sizes = self.control_sizes(images, key)
        if vae_sizes is not None:  # musubi-tuner's rules resize by cover + centre crop
            images = [cover_crop(im, size) for im, size in zip(images, vae_sizes)]
        return with_references(cond, reference_latents(images, codec, self.version, vae_sizes))

    def default_image_size(self, control_sizes: list[tuple[int, int]]) -> tuple[int, int] | None:
        if not control_sizes:
            return None
        width, height = default_output_size(self.version, control_sizes)
        return height, width

    def cached_conditioning(self, text: list[dict[str, torch.Tensor]], latent_extras: list[dict[str, torch.Tensor]]) -> Conditioning:
        cond = super().cached_conditioning(text, latent_extras)
        per_item = [sorted((int(m[1]), t) for name, t in extras.items() if (m := CONTROL_NAME.match(name))) for extras in latent_extras]
        counts = {len(refs) for refs in per_item}  # none: items without control images, trained as text-to-image
        if len(counts) > 1:
            raise ConfigError("a batch mixes items with different numbers of control images; the loader groups them "
                              "apart, so the caches changed under it: re-run cache-latents.")
        refs = [torch.stack([item[k][1] for item in per_item]) for k in range(counts.pop())]
        return with_references(cond, refs)

