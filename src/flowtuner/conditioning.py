"""Prompts (and their control images) -> Conditioning, shared by `flowtuner generate` and training previews.

A conditioning is keyed by (text, control image paths): an edit model reads the control images with the text,
so the same words with other images are another conditioning. The negative prompt of a job is encoded with the
job's control images too, as diffusers' Edit pipelines do."""

from __future__ import annotations

from collections import defaultdict

from PIL import Image

from flowtuner.families.base import Conditioning, Family, ImageCodec, TextEncoder
from flowtuner.guidance import runs_uncond

Key = tuple[str, tuple[str, ...]]


def controls_of(job) -> tuple[str, ...]:
    return tuple(job.control_images or ())


def cond_keys(job) -> tuple[Key, Key | None]:
    """(the prompt's key, the negative prompt's key or None when guidance skips the unconditional pass)."""
    controls = controls_of(job)
    negative = (job.negative_prompt, controls) if runs_uncond(job.guidance_scale) else None
    return (job.prompt, controls), negative


def keys_of(jobs) -> list[Key]:
    """Every distinct conditioning the jobs need, in first-use order."""
    keys = [k for job in jobs for k in cond_keys(job) if k is not None]
    return list(dict.fromkeys(keys))


def control_images(paths: tuple[str, ...]) -> list[Image.Image]:
    from flowtuner.init_images import open_image  # it imports the sampling module, which imports this one

    return [open_image(p) for p in paths]


def encode(encoder: TextEncoder, keys: list[Key], batch: int = 8) -> dict[Key, Conditioning]:
    """Every key encoded once, texts batched per set of control images."""
    by_controls: dict[tuple[str, ...], list[str]] = defaultdict(list)
    for text, controls in keys:
        by_controls[controls].append(text)
    out = {}
    for controls, texts in by_controls.items():
        images = control_images(controls) if controls else None
        for i in range(0, len(texts), batch):
            chunk = texts[i : i + batch]
            conds = encoder.encode(chunk, [images] * len(chunk) if images else None)
            out.update(((t, controls), c) for t, c in zip(chunk, conds))
    return out


def with_controls(family: Family, conds: dict[Key, Conditioning], codec: ImageCodec) -> dict[Key, Conditioning]:
    """Conditionings whose key has control images, completed by the family with what it takes from the images
    themselves (an edit model's reference latents); encoded once per set of images."""
    done: dict[tuple[str, ...], Conditioning] = {}
    out = dict(conds)
    for (text, controls), cond in conds.items():
        if controls:
            if controls not in done:
                done[controls] = family.control_conditioning(cond, control_images(controls), codec)
            out[(text, controls)] = Conditioning(cond.embeds, cond.mask, {**cond.extra, **done[controls].extra})
    return out


def needs_controls(jobs) -> bool:
    return any(controls_of(j) for j in jobs)
