"""Prompts (and their control images) -> Conditioning, shared by `flowtuner generate` and training previews.

A conditioning is keyed by (text, control image paths, the family's control key): an edit model reads the
control images with the text, so the same words with other images (or images sized otherwise) are another
conditioning. The negative prompt of a job is encoded with the
job's control images too, as diffusers' Edit pipelines do."""

from __future__ import annotations

from collections import defaultdict

from PIL import Image

from flowtuner.families.base import Conditioning, Family, ImageCodec, TextEncoder
from flowtuner.guidance import runs_uncond

Key = tuple[str, tuple[str, ...], tuple]


def controls_of(job) -> tuple[str, ...]:
    return tuple(job.control_images or ())


def cond_keys(job, family: Family) -> tuple[Key, Key | None]:
    """(the prompt's key, the negative prompt's key or None when guidance skips the unconditional pass)."""
    controls = controls_of(job)
    extra = family.control_key(job) if controls else ()
    negative = (job.negative_prompt, controls, extra) if runs_uncond(job.guidance_scale, job.guidance_methods()) else None
    return (job.prompt, controls, extra), negative


def keys_of(jobs, family: Family) -> list[Key]:
    """Every distinct conditioning the jobs need, in first-use order."""
    keys = [k for job in jobs for k in cond_keys(job, family) if k is not None]
    return list(dict.fromkeys(keys))


def control_images(paths: tuple[str, ...]) -> list[Image.Image]:
    from flowtuner.init_images import open_image  # it imports the sampling module, which imports this one

    return [open_image(p) for p in paths]


def encode(encoder: TextEncoder, keys: list[Key], family: Family, batch: int = 8) -> dict[Key, Conditioning]:
    """Every key encoded once, texts batched per set of control images."""
    by_controls: dict[tuple, list[str]] = defaultdict(list)
    for text, controls, extra in keys:
        by_controls[(controls, extra)].append(text)
    out = {}
    for (controls, extra), texts in by_controls.items():
        images = control_images(controls) if controls else None
        sizes = family.control_sizes(images, extra)[0] if images else None
        for i in range(0, len(texts), batch):
            chunk = texts[i : i + batch]
            if images:
                conds = encoder.encode(chunk, [images] * len(chunk), None if sizes is None else [sizes] * len(chunk))
            else:
                conds = encoder.encode(chunk)
            out.update(((t, controls, extra), c) for t, c in zip(chunk, conds))
    return out


def with_controls(family: Family, conds: dict[Key, Conditioning], codec: ImageCodec) -> dict[Key, Conditioning]:
    """Conditionings whose key has control images, completed by the family with what it takes from the images
    themselves (an edit model's reference latents); encoded once per set of images."""
    done: dict[tuple, Conditioning] = {}
    out = dict(conds)
    for (text, controls, extra), cond in conds.items():
        if controls:
            if (controls, extra) not in done:
                done[(controls, extra)] = family.control_conditioning(cond, control_images(controls), codec, extra)
            out[(text, controls, extra)] = Conditioning(cond.embeds, cond.mask, {**cond.extra, **done[(controls, extra)].extra})
    return out


def needs_controls(jobs) -> bool:
    return any(controls_of(j) for j in jobs)
