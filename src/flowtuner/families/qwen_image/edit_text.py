"""Qwen-Image-Edit text encoding: the prompt and its control images through the whole Qwen2.5-VL.

Per version (diffusers 0.42.1 `QwenImageEditPipeline` / `QwenImageEditPlusPipeline`, musubi-tuner):
- the template: v1 holds one `<|vision_start|><|image_pad|><|vision_end|>` before the prompt; 2509 and
  2511 put `Picture N: <|vision_start|><|image_pad|><|vision_end|>` per image before the prompt;
- the VL image size (edit_sizes.vl_size), resized with PIL Lanczos as diffusers does, then transformers'
  PIL image processor (smart_resize to multiples of 28, bicubic; no torchvision);
- the dropped prefix: found from the tokens as for text-to-image (second `<|im_start|>` + `user\\n`),
  which is diffusers' fixed 64 for both edit templates; the vision tokens and "Picture N: " are kept.

M-RoPE: image tokens get transformers' 3-D positions (`get_rope_index`), as the model was trained and as
musubi-tuner (transformers 4.57) and ComfyUI compute them. diffusers 0.42.1 on transformers 5.x does not
pass `mm_token_type_ids`, so its image tokens silently get 1-D positions; flowtuner does not copy that.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import PIL.Image
import torch
from transformers import Qwen2_5_VLModel
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from flowtuner.errors import ConfigError
from flowtuner.families.base import Conditioning, TextEncoder
from flowtuner.families.qwen_image.edit_sizes import check_image_count, check_version, vl_size
from flowtuner.families.qwen_image.text_encoder import prompt_start

EDIT_SYSTEM = (
    "<|im_start|>system\nDescribe the key features of the input image (color, shape, size, texture, objects, "
    "background), then explain how the user's text instruction should alter or modify the image. Generate a new "
    "image that meets the user's requirements while maintaining consistency with the original input where "
    "appropriate.<|im_end|>\n<|im_start|>user\n"
)
IMAGE_SLOT = "<|vision_start|><|image_pad|><|vision_end|>"
IMAGE_PAD = "<|image_pad|>"
ASSISTANT = "<|im_end|>\n<|im_start|>assistant\n"
# Qwen/Qwen-Image-Edit processor/preprocessor_config.json (reference §7.1); transformers' own default
# max_pixels (1,003,520) is smaller than v1's ~1 MP control image and would shrink it.
MIN_PIXELS = 56 * 56
MAX_PIXELS = 28 * 28 * 16384
# diffusers' VaeImageProcessor.resize (its default resample is "lanczos")
VL_RESAMPLE = PIL.Image.Resampling.LANCZOS


@dataclass(frozen=True)
class EditTemplate:
    template: str  # `{}` = the per-image prefixes followed by the prompt
    picture: str | None  # per-image prefix ("{}" = 1-based number); None: the image slot is in the template


TEMPLATES = {
    "edit": EditTemplate(EDIT_SYSTEM + IMAGE_SLOT + "{}" + ASSISTANT, None),
    "edit-2509": EditTemplate(EDIT_SYSTEM + "{}" + ASSISTANT, "Picture {}: " + IMAGE_SLOT),
    "edit-2511": EditTemplate(EDIT_SYSTEM + "{}" + ASSISTANT, "Picture {}: " + IMAGE_SLOT),
}


def prompt_text(version: str, prompt: str, image_count: int) -> str:
    t = TEMPLATES[check_version(version)]
    prefix = "" if t.picture is None else "".join(t.picture.format(i + 1) for i in range(image_count))
    return t.template.format(prefix + prompt)


def text_recipe(version: str) -> str:
    """Provenance of edit text caches: template, image numbering, VL sizing and processor, cut, output."""
    t = TEMPLATES[check_version(version)]
    vl = vl_size(version, 1000, 1000), vl_size(version, 1600, 900)
    parts = (version, t.template, t.picture, f"vl{vl}", f"smart28[{MIN_PIXELS},{MAX_PIXELS}]bicubic", "lanczos",
             "cut-after-user", "mrope", "last-hidden")
    return hashlib.sha256("|".join(map(str, parts)).encode()).hexdigest()[:16]


def image_processor(config: dict | None = None) -> Qwen2VLImageProcessorPil:
    """The VL image processor with the model's pixel limits: those of its `preprocessor_config.json` when the files
    have one (diffusers repos keep it in processor/), else the released models' (MIN_PIXELS, MAX_PIXELS)."""
    config = config or {}
    size = config.get("size") or {}
    low = config.get("min_pixels", size.get("shortest_edge", MIN_PIXELS))
    high = config.get("max_pixels", size.get("longest_edge", MAX_PIXELS))
    return Qwen2VLImageProcessorPil(min_pixels=low, max_pixels=high)


def vl_image(version: str, image: PIL.Image.Image, size: tuple[int, int] | None = None) -> PIL.Image.Image:
    """The control image at the size the VL encoder gets it (before the processor's smart_resize): `size`
    (width, height) where another rule applies (musubi-tuner's flags: cover + centre crop), else diffusers'."""
    if image.mode not in ("RGB", "RGBA", "L"):
        image = image.convert("RGB")
    if size is not None:
        return cover_crop(image, size)
    width, height = vl_size(version, *image.size)
    return image.resize((width, height), resample=VL_RESAMPLE)


def cover_crop(image: PIL.Image.Image, size: tuple[int, int]) -> PIL.Image.Image:
    """musubi-tuner's resize to a bucket: scale to cover `size` (width, height), then crop the centre."""
    if image.size == tuple(size):
        return image
    scale = max(size[0] / image.width, size[1] / image.height)
    w, h = max(size[0], round(image.width * scale)), max(size[1], round(image.height * scale))
    image = image.resize((w, h), resample=VL_RESAMPLE)
    left, top = (w - size[0]) // 2, (h - size[1]) // 2
    return image.crop((left, top, left + size[0], top + size[1]))


class QwenEditTextEncoder(TextEncoder):
    """`encode(prompts, images)`: one Conditioning [1, L, D] per prompt; `images[i]` are prompt i's
    control images in order (v1: exactly one; 2509/2511: one to three)."""

    def __init__(self, model: Qwen2_5_VLModel, tokenizer, version: str, processor_config: dict | None = None):
        self.model = model
        self.tokenizer = tokenizer
        self.version = check_version(version)
        self.processor = image_processor(processor_config)
        self.image_pad = tokenizer.convert_tokens_to_ids(IMAGE_PAD)
        self.im_start = tokenizer.convert_tokens_to_ids("<|im_start|>")
        self.user_newline = tokenizer("user\n", add_special_tokens=False)["input_ids"]
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        merge = model.config.vision_config.spatial_merge_size if model is not None else 2
        self.merge_cells = merge * merge

    def text_recipe(self) -> str:
        return text_recipe(self.version)

    def pixels(self, images: list[PIL.Image.Image], sizes: list | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(pixel_values [patches, C·T·P·P], image_grid_thw [n, 3]) for the processor."""
        sizes = sizes or [None] * len(images)
        out = self.processor([vl_image(self.version, im, size) for im, size in zip(images, sizes)], return_tensors="pt")
        return out["pixel_values"], out["image_grid_thw"]

    def tokenize(self, prompt: str, grids: torch.Tensor) -> tuple[list[int], int]:
        """(token ids with each `<|image_pad|>` expanded to its image's token count, cut index)."""
        ids = self.tokenizer(prompt_text(self.version, prompt, len(grids)), add_special_tokens=False)["input_ids"]
        counts = iter((grids.prod(-1) // self.merge_cells).tolist())
        expanded: list[int] = []
        for t in ids:
            expanded.extend([t] * next(counts) if t == self.image_pad else [t])
        if next(counts, None) is not None:
            raise ConfigError("a prompt holds an <|image_pad|> token of its own; remove it from the prompt text.")
        return expanded, prompt_start(expanded, self.im_start, self.user_newline)

    def check(self, prompts: list[str], images: list[list[PIL.Image.Image]]) -> None:
        if len(images) != len(prompts):
            raise ConfigError(f"{len(prompts)} prompts but {len(images)} control image lists; give one list per prompt.")
        for imgs in images:
            if imgs:  # none: a training item without control images (encoded as text-to-image, as musubi-tuner does)
                check_image_count(self.version, len(imgs))
        for prompt in prompts:
            if IMAGE_PAD in prompt or "<|vision_start|>" in prompt:
                raise ConfigError(f"the prompt {prompt[:40]!r} holds vision tokens; images come from the control images only.")

    @torch.no_grad()
    def encode(self, prompts: list[str], images: list[list[PIL.Image.Image]], sizes: list[list] | None = None) -> list[Conditioning]:
        """`sizes`: per prompt, the (width, height) each image is resized to for the VL encoder instead of
        diffusers' rule (musubi-tuner's --resize_control_to_* flags)."""
        self.check(prompts, images)
        if not all(images):
            return self._some_without_images(prompts, images, sizes)
        pixel_parts, grid_parts, tokens = [], [], []
        for k, (prompt, imgs) in enumerate(zip(prompts, images)):
            pixels, grids = self.pixels(imgs, sizes[k] if sizes else None)
            pixel_parts.append(pixels)
            grid_parts.append(grids)
            tokens.append(self.tokenize(prompt, grids))
        hidden = self._forward(tokens, torch.cat(pixel_parts), torch.cat(grid_parts))
        return [Conditioning(hidden[i : i + 1, cut : len(ids)].cpu()) for i, (ids, cut) in enumerate(tokens)]

    def _some_without_images(self, prompts, images, sizes) -> list[Conditioning]:
        """Prompts without control images take Qwen-Image's text-to-image template and the language model alone
        (musubi-tuner trains such edit-dataset items that way); the others are encoded as usual."""
        from flowtuner.families.qwen_image.text_encoder import QwenTextEncoder

        plain = [i for i, imgs in enumerate(images) if not imgs]
        rest = [i for i, imgs in enumerate(images) if imgs]
        out: dict[int, Conditioning] = {}
        text_only = QwenTextEncoder(self.model.language_model, self.tokenizer)
        out.update(zip(plain, text_only.encode([prompts[i] for i in plain])))
        if rest:
            out.update(zip(rest, self.encode([prompts[i] for i in rest], [images[i] for i in rest],
                                             [sizes[i] for i in rest] if sizes else None)))
        return [out[i] for i in range(len(prompts))]

    def _forward(self, tokens: list[tuple[list[int], int]], pixels: torch.Tensor, grids: torch.Tensor) -> torch.Tensor:
        """Right-padded batch through the model; mm_token_type_ids makes transformers compute M-RoPE."""
        width = max(len(ids) for ids, _ in tokens)
        input_ids = torch.full((len(tokens), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(tokens), width), dtype=torch.long)
        for i, (ids, _) in enumerate(tokens):
            input_ids[i, : len(ids)] = torch.tensor(ids)
            mask[i, : len(ids)] = 1
        device = self.model.language_model.embed_tokens.weight.device
        types = (input_ids == self.image_pad).int()
        self.model.rope_deltas = None  # transformers caches these for generation; each call is a fresh prompt
        out = self.model(
            input_ids=input_ids.to(device), attention_mask=mask.to(device), mm_token_type_ids=types.to(device),
            pixel_values=pixels.to(device), image_grid_thw=grids.to(device), use_cache=False,
        )
        return out.last_hidden_state
