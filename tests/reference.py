"""The reference: diffusers' QwenImagePipeline over the same tiny modules."""

from __future__ import annotations

import numpy as np
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, QwenImagePipeline

# Qwen/Qwen-Image scheduler/scheduler_config.json
QWEN_SCHEDULER = dict(
    num_train_timesteps=1000, shift=1.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=0.9,
    base_image_seq_len=256, max_image_seq_len=8192, shift_terminal=0.02, time_shift_type="exponential",
)


def reference_pipeline(models: dict, tokenizer) -> QwenImagePipeline:
    return QwenImagePipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(**QWEN_SCHEDULER), vae=models["vae"],
        text_encoder=models["te"], tokenizer=tokenizer, transformer=models["dit"],
    )


def reference_run(pipe, prompt: str, height: int, width: int, steps: int, cfg: float, seed: int,
                  negative: str | None = " ") -> tuple[torch.Tensor, np.ndarray]:
    """(unpacked latents [1, 16, 1, h, w], uint8 image [H, W, 3]) as diffusers produces them."""
    kwargs = dict(prompt=prompt, height=height, width=width, num_inference_steps=steps, true_cfg_scale=cfg,
                  negative_prompt=negative if cfg > 1 else None)
    packed = pipe(**kwargs, generator=torch.Generator("cpu").manual_seed(seed), output_type="latent").images
    latents = pipe._unpack_latents(packed, height, width, pipe.vae_scale_factor)
    image = pipe(**kwargs, generator=torch.Generator("cpu").manual_seed(seed), output_type="np").images[0]
    return latents, (image * 255).round().astype(np.uint8)


def reference_edit_pipelines(models: dict, tokenizer) -> dict:
    """diffusers' img2img and inpainting pipelines over the same modules."""
    from diffusers import QwenImageImg2ImgPipeline, QwenImageInpaintPipeline

    parts = dict(vae=models["vae"], text_encoder=models["te"], tokenizer=tokenizer, transformer=models["dit"])
    return {"img2img": QwenImageImg2ImgPipeline(scheduler=FlowMatchEulerDiscreteScheduler(**QWEN_SCHEDULER), **parts),
            "inpaint": QwenImageInpaintPipeline(scheduler=FlowMatchEulerDiscreteScheduler(**QWEN_SCHEDULER), **parts)}
