"""Components are freed as soon as the run drops them (plain reference counting, no gc pass), so the
text encoder, DiT and VAE are never co-resident."""

from __future__ import annotations

import gc
import weakref

import torch

from flowtuner.generate import Job, encode_prompts, sample_all


def test_components_are_freed_by_refcount(tiny_files, monkeypatch):
    from flowtuner.families.qwen_image import QwenImageFamily

    family = QwenImageFamily()
    paths = family.resolve_paths(model=tiny_files["repo"])
    refs = []
    for name in ("load_text_encoder", "load_denoiser"):
        original = getattr(family, name)

        def tracking(*a, _orig=original, **k):
            obj = _orig(*a, **k)
            refs.append(weakref.ref(next(iter(vars(obj).values()))))  # the torch module inside
            return obj

        monkeypatch.setattr(family, name, tracking)
    jobs = [Job(prompt="a red circle", negative_prompt=" ", height=32, width=32, steps=2, guidance_scale=4.0, seed=0)]
    gc.disable()
    try:
        conds = encode_prompts(family, paths, jobs, torch.device("cpu"))
        assert refs[0]() is None, "text encoder still alive after encoding"
        sample_all(family, paths, jobs, conds, torch.device("cpu"), "torch")
        assert refs[1]() is None, "DiT still alive after sampling"
    finally:
        gc.enable()
