"""Qwen-Image-Edit denoising == diffusers' QwenImageEditPipeline (v1) and QwenImageEditPlusPipeline (2509, 2511)
on the same tiny random modules, compared on latents; plus the training-side contract (target tokens in and
out, clean references, no gradient into them).

The text encoder is bypassed on both sides: the same prompt embeddings (and masks) go to diffusers as
prompt_embeds and to flowtuner as Conditionings. The control images run through both sides' own resizing
and the same tiny VAE.

Both sides' ~1 MP reference area is shrunk to SMALL_AREA pixels (diffusers' calculate_dimensions and
flowtuner's edit_sizes.VAE_AREA patched alike) so a run takes a second, not a minute; the real area's
arithmetic is compared with diffusers' own function in test_vae_sizes_match_diffusers."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, QwenImageEditPipeline, QwenImageEditPlusPipeline, QwenImageTransformer2DModel
from PIL import Image

from flowtuner.errors import ConfigError, FlowtunerError
from flowtuner.families.base import Conditioning
from flowtuner.families.qwen_image import edit_sizes
from flowtuner.families.qwen_image.dit import DiTInfo
from flowtuner.families.qwen_image.edit import (
    REFERENCE_LATENTS, QwenImageEditDenoiser, reference_latents, with_references,
)
from flowtuner.families.qwen_image.family import QwenImageFamily, pack
from flowtuner.families.qwen_image.tiny import TEXT_HIDDEN, tiny_dit
from flowtuner.sampling import Job, sample_job
from flowtuner.train.objective import per_sample_loss
from tests.reference import QWEN_SCHEDULER

REAL_AREA = 1024 * 1024
SMALL_AREA = 128 * 128
# Control images of several aspect ratios (W, H), as the issue asks: 160x96, 128x128, 96x224.
SIZES = [(160, 96), (128, 128), (96, 224)]


def loud_dit(zero_cond_t: bool = False) -> QwenImageTransformer2DModel:
    """The tiny DiT with sharper attention (QK-norm gains x3) and stronger modulation (x3): at default init the
    target barely attends to the references, and a wrong frame index or a missing zero_cond_t would hide
    under the tolerance. zero_cond_t is a constructor argument (from_config drops a default-valued key)."""
    base = tiny_dit()
    args = {k: v for k, v in base.config.items() if not k.startswith("_") and k != "zero_cond_t"}
    dit = QwenImageTransformer2DModel(**args, zero_cond_t=zero_cond_t).eval()
    dit.load_state_dict(base.state_dict())
    with torch.no_grad():
        for name, p in dit.named_parameters():
            if ".norm_q." in name or ".norm_k." in name or ".norm_added_" in name or "_mod." in name:
                p.mul_(3.0)
    return dit.requires_grad_(False)


def control_image(size: tuple[int, int], seed: int) -> Image.Image:
    """Smooth random colours (a photo-like image: Lanczos resizing matters, but not wildly)."""
    w, h = size
    rng = np.random.default_rng(seed)
    coarse = Image.fromarray((rng.random((max(2, h // 16), max(2, w // 16), 3)) * 255).astype(np.uint8))
    return coarse.resize((w, h), Image.Resampling.BICUBIC)


def embeddings(seed: int, length: int, pad: int = 0) -> Conditioning:
    """Random prompt embeddings; `pad` trailing positions masked out (as a padded batch of prompts has)."""
    g = torch.Generator().manual_seed(seed)
    embeds = torch.randn(1, length, TEXT_HIDDEN, generator=g)
    mask = (torch.arange(length) < length - pad).long().unsqueeze(0) if pad else None
    return Conditioning(embeds, mask)


@pytest.fixture
def small_area(monkeypatch):
    """Shrink the 1 MP reference / default-output area to SMALL_AREA in diffusers and in flowtuner alike."""
    import diffusers.pipelines.qwenimage.pipeline_qwenimage_edit as v1_module
    import diffusers.pipelines.qwenimage.pipeline_qwenimage_edit_plus as plus_module

    for module in (v1_module, plus_module):
        real = module.calculate_dimensions
        monkeypatch.setattr(module, "calculate_dimensions",
                            lambda area, ratio, real=real: real(SMALL_AREA if area == REAL_AREA else area, ratio))
    monkeypatch.setattr(plus_module, "VAE_IMAGE_SIZE", SMALL_AREA)
    monkeypatch.setattr(edit_sizes, "VAE_AREA", SMALL_AREA)


@pytest.fixture(scope="module")
def dits():
    return {False: loud_dit(False), True: loud_dit(True)}


def pipeline(version: str, dit, vae):
    cls = QwenImageEditPipeline if version == "edit" else QwenImageEditPlusPipeline
    return cls(scheduler=FlowMatchEulerDiscreteScheduler(**QWEN_SCHEDULER), vae=vae, text_encoder=None, tokenizer=None,
               processor=None, transformer=dit)


def diffusers_latents(version, dit, vae, images, pos: Conditioning, neg: Conditioning, cfg, steps, seed,
                      height=None, width=None) -> torch.Tensor:
    pipe = pipeline(version, dit, vae)
    kwargs = dict(prompt_embeds=pos.embeds, prompt_embeds_mask=pos.mask, true_cfg_scale=cfg, num_inference_steps=steps,
                  height=height, width=width, generator=torch.Generator("cpu").manual_seed(seed), output_type="latent")
    if cfg > 1:
        kwargs.update(negative_prompt_embeds=neg.embeds, negative_prompt_embeds_mask=neg.mask)
    packed = pipe(image=images if version != "edit" else images[0], **kwargs).images
    if height is None:
        width, height = edit_sizes.default_output_size(version, [im.size for im in images])
    return pipe._unpack_latents(packed, height, width, pipe.vae_scale_factor)


def flowtuner_latents(version, dit, vae, images, pos, neg, cfg, steps, seed, height=None, width=None,
                      info: DiTInfo | None = None, denoiser_version: str | None = None) -> torch.Tensor:
    from flowtuner.families.qwen_image.vae import QwenImageCodec

    if height is None:
        width, height = edit_sizes.default_output_size(version, [im.size for im in images])
    refs = reference_latents(images, QwenImageCodec(vae), version)
    conds = {("pos", (), ()): with_references(pos, refs), ("neg", (), ()): with_references(neg, refs)}
    job = Job(prompt="pos", negative_prompt="neg", height=height, width=width, steps=steps, guidance_scale=cfg, seed=seed)
    denoiser = QwenImageEditDenoiser(dit, info, denoiser_version)
    [(_, _, latents)] = sample_job(denoiser, QwenImageFamily(), job, conds)
    return latents


def assert_same(ours: torch.Tensor, ref: torch.Tensor) -> None:
    assert ours.shape == ref.shape, (ours.shape, ref.shape)
    assert torch.allclose(ours, ref.float(), atol=1e-4, rtol=0), (ours - ref).abs().max()


# ------------------------------------------------------------------ sizes and reference latents
@pytest.mark.parametrize("size", SIZES + [(1920, 1080), (1024, 768), (1328, 1328), (333, 1000), (4000, 3)])
def test_vae_sizes_match_diffusers(size):
    from diffusers.pipelines.qwenimage import pipeline_qwenimage_edit as v1_module
    from diffusers.pipelines.qwenimage import pipeline_qwenimage_edit_plus as plus_module

    ratio = size[0] / size[1]
    assert edit_sizes.vae_size("edit", *size) == v1_module.calculate_dimensions(REAL_AREA, ratio)[:2]
    for version in ("edit-2509", "edit-2511"):
        assert edit_sizes.vae_size(version, *size) == plus_module.calculate_dimensions(plus_module.VAE_IMAGE_SIZE, ratio)


def test_reference_latents_are_diffusers_encoding(small_area, tiny_models):
    """Lanczos resize to the VAE size, posterior mode, per-channel normalisation: diffusers' own
    preprocess + _encode_vae_image on the same images."""
    from flowtuner.families.qwen_image.vae import QwenImageCodec

    vae = tiny_models["vae"]
    pipe = pipeline("edit-2509", loud_dit(), vae)
    images = [control_image(s, i) for i, s in enumerate(SIZES)]
    ours = reference_latents(images, QwenImageCodec(vae), "edit-2509")
    for image, latent in zip(images, ours):
        w, h = edit_sizes.vae_size("edit-2509", *image.size)
        pixels = pipe.image_processor.preprocess(image, h, w).unsqueeze(2)
        ref = pipe._encode_vae_image(pixels, torch.Generator().manual_seed(0))
        assert latent.shape == ref.shape == (1, 16, 1, h // 8, w // 8)
        assert torch.equal(latent, ref)


# ------------------------------------------------------------------ parity: sampled latents
@pytest.mark.parametrize("size,cfg,out", [
    ((160, 96), 4.0, None),  # default output size from the control image
    ((96, 224), 4.0, (64, 96)),  # reference grid larger than the target (the RoPE text offset follows it)
    ((128, 128), 1.0, (80, 48)),  # no unconditional pass
])
def test_edit_v1_matches_diffusers(small_area, dits, tiny_models, size, cfg, out):
    images = [control_image(size, 1)]
    pos, neg = embeddings(1, 12), embeddings(2, 9, pad=3)
    height, width = out or (None, None)
    args = (dits[False], tiny_models["vae"], images, pos, neg, cfg, 3, 5, height, width)
    assert_same(flowtuner_latents("edit", *args), diffusers_latents("edit", *args))


@pytest.mark.parametrize("sizes", [SIZES[:1], SIZES[:2], SIZES], ids=["1image", "2images", "3images"])
def test_edit_2509_matches_diffusers(small_area, dits, tiny_models, sizes):
    images = [control_image(s, i) for i, s in enumerate(sizes)]
    pos, neg = embeddings(3, 10), embeddings(4, 8, pad=2)
    args = (dits[False], tiny_models["vae"], images, pos, neg, 4.0, 3, 11)
    assert_same(flowtuner_latents("edit-2509", *args), diffusers_latents("edit-2509", *args))


def test_edit_2509_explicit_size_matches_diffusers(small_area, dits, tiny_models):
    images = [control_image(s, i) for i, s in enumerate(reversed(SIZES[:2]))]
    pos, neg = embeddings(5, 10), embeddings(6, 10)
    args = (dits[False], tiny_models["vae"], images, pos, neg, 2.5, 2, 3, 48, 112)
    assert_same(flowtuner_latents("edit-2509", *args), diffusers_latents("edit-2509", *args))


@pytest.mark.parametrize("source", ["config", "marker", "version"])
def test_edit_2511_matches_diffusers(small_area, tiny_models, source):
    """diffusers runs a DiT whose config has zero_cond_t=True (Qwen-Image-Edit-2511's transformer/config.json).
    flowtuner gets it from that config, from a ComfyUI file's __index_timestep_zero__ marker (a DiT built
    without the flag, switched on), or from --model_version edit-2511."""
    images = [control_image(s, i + 7) for i, s in enumerate(SIZES[:2])]
    pos, neg = embeddings(7, 10), embeddings(8, 6, pad=1)
    # fresh DiTs: the denoiser switches the flag in place, and a shared module must not carry a switch over
    reference = loud_dit(True)
    ref = diffusers_latents("edit-2511", reference, tiny_models["vae"], images, pos, neg, 4.0, 3, 2)
    dit, info, version = {
        "config": (loud_dit(True), None, None),
        "marker": (loud_dit(False), DiTInfo({}, "", torch.float32, True, {}), None),
        "version": (loud_dit(False), None, "edit-2511"),
    }[source]
    ours = flowtuner_latents("edit-2511", dit, tiny_models["vae"], images, pos, neg, 4.0, 3, 2, info=info,
                             denoiser_version=version)
    assert dit.config.zero_cond_t and reference.config.zero_cond_t
    assert_same(ours, ref)


def test_outputs_depend_on_references_and_zero_cond_t(small_area, dits, tiny_models):
    """Guards the parity tests against a model deaf to what they test: other control images, the same
    images in another order (frame indices), and 2511's t = 0 modulation all move the latents."""
    images = [control_image(s, i) for i, s in enumerate(SIZES[:2])]
    pos, neg = embeddings(3, 10), embeddings(4, 8)
    vae, size = tiny_models["vae"], (48, 80)
    base = flowtuner_latents("edit-2509", dits[False], vae, images, pos, neg, 4.0, 2, 1, *size)
    others = [control_image(s, i + 20) for i, s in enumerate(SIZES[:2])]
    variants = {
        "other images": flowtuner_latents("edit-2509", dits[False], vae, others, pos, neg, 4.0, 2, 1, *size),
        "swapped order": flowtuner_latents("edit-2509", dits[False], vae, images[::-1], pos, neg, 4.0, 2, 1, *size),
        "zero_cond_t": flowtuner_latents("edit-2511", dits[True], vae, images, pos, neg, 4.0, 2, 1, *size),
    }
    for name, latents in variants.items():
        assert latents.shape == base.shape, name
        assert (latents - base).abs().max() > 1e-2, name


# ------------------------------------------------------------------ training side
def test_training_predicts_target_tokens_from_clean_references(dits):
    """The DiT sees [noisy target | clean references] (the references exactly as packed, never noised); the
    prediction and the loss cover the target tokens only; no gradient reaches the reference latents."""
    g = torch.Generator().manual_seed(0)
    dit = loud_dit(True)
    dit.img_in.requires_grad_(True)
    denoiser = QwenImageEditDenoiser(dit)
    target = torch.randn(2, 16, 1, 6, 10, generator=g)  # a batch of two 48x80 targets
    batch = {"latents_control_0": torch.randn(2, 16, 1, 8, 8, generator=g).requires_grad_(True),
             "latents_control_1": torch.randn(2, 16, 1, 4, 12, generator=g).requires_grad_(True)}
    cond = with_references(embeddings(1, 7), [batch["latents_control_0"], batch["latents_control_1"]])
    x0, geometry = denoiser.from_latents(target)
    seen = []
    handle = dit.img_in.register_forward_pre_hook(lambda module, args: seen.append(args[0].detach().clone()))
    try:
        noise, sigma = torch.randn(x0.shape, generator=g), torch.tensor([0.3, 0.8])
        v = denoiser.predict(x0, sigma, cond, geometry)
        assert v.shape == x0.shape == (2, 15, 64)
        loss = per_sample_loss(denoiser.predict, x0, noise, sigma, cond, geometry)
    finally:
        handle.remove()
    assert loss.shape == (2,)
    n = x0.shape[1]
    x_t = (1 - sigma.view(-1, 1, 1)) * x0 + sigma.view(-1, 1, 1) * noise
    refs = torch.cat([pack(batch["latents_control_0"]), pack(batch["latents_control_1"])], dim=1).detach()
    assert torch.equal(seen[1][:, n:], refs)
    assert torch.allclose(seen[1][:, :n], x_t, atol=1e-6)
    loss.mean().backward()
    assert dit.img_in.weight.grad is not None and dit.img_in.weight.grad.abs().sum() > 0
    assert all(r.grad is None for r in batch.values())


def test_batch_one_references_serve_a_batch(dits):
    """A [1, ...] reference (one control for every sample, as at generation) equals the same reference
    repeated to the batch."""
    g = torch.Generator().manual_seed(1)
    denoiser = QwenImageEditDenoiser(dits[False])
    x = torch.randn(2, 12, 64, generator=g)
    ref = torch.randn(1, 16, 1, 6, 6, generator=g)
    geometry = denoiser.geometry(48, 64)
    one = denoiser.predict(x, torch.tensor(0.5), with_references(embeddings(2, 5), [ref]), geometry)
    two = denoiser.predict(x, torch.tensor(0.5), with_references(embeddings(2, 5), [ref.expand(2, -1, -1, -1, -1)]), geometry)
    assert torch.equal(one, two)


# ------------------------------------------------------------------ errors
def test_missing_references_is_a_clear_error(dits):
    denoiser = QwenImageEditDenoiser(dits[False])
    with pytest.raises(FlowtunerError, match="control images"):
        denoiser.predict(torch.zeros(1, 4, 64), torch.tensor(0.5), embeddings(0, 3), denoiser.geometry(32, 32))


def test_too_many_control_images_is_a_clear_error(tiny_models):
    from flowtuner.families.qwen_image.vae import QwenImageCodec

    images = [control_image((32, 32), i) for i in range(4)]
    with pytest.raises(ConfigError, match="edit-2509"):
        reference_latents(images[:2], QwenImageCodec(tiny_models["vae"]), "edit")
    with pytest.raises(ConfigError, match="got 4"):
        reference_latents(images, QwenImageCodec(tiny_models["vae"]), "edit-2511")


def test_a_16_bit_control_image_is_a_clear_error(tiny_models):
    from flowtuner.families.qwen_image.vae import QwenImageCodec

    deep = Image.fromarray(np.full((32, 32), 40000, dtype=np.uint16))
    with pytest.raises(ConfigError, match="16-bit"):
        reference_latents([deep], QwenImageCodec(tiny_models["vae"]), "edit")


def test_a_2511_file_refuses_another_version():
    marked = DiTInfo({}, "", torch.float32, True, {})
    with pytest.raises(ConfigError, match="edit-2511"):
        QwenImageEditDenoiser(loud_dit(False), marked, "edit-2509")
    with pytest.raises(ConfigError, match="edit-2511"):
        QwenImageEditDenoiser(loud_dit(True), None, "edit")
    assert not QwenImageEditDenoiser(loud_dit(False), None, "edit-2509").zero_cond_t


def test_references_ride_in_conditioning_extra():
    cond = Conditioning(torch.zeros(1, 2, TEXT_HIDDEN), None, {"other": 1})
    refs = [torch.zeros(1, 16, 1, 2, 2)]
    out = with_references(cond, refs)
    assert out.extra == {"other": 1, REFERENCE_LATENTS: refs} and cond.extra == {"other": 1}


@pytest.mark.slow
def test_edit_v1_at_the_real_area_matches_diffusers(dits, tiny_models):
    """Unpatched: the control image at diffusers' own ~1 MP (160x96 -> 1312x800, 4100 reference tokens)."""
    images = [control_image((160, 96), 3)]
    pos = embeddings(9, 8)
    args = (dits[False], tiny_models["vae"], images, pos, pos, 1.0, 2, 4, 32, 48)
    assert_same(flowtuner_latents("edit", *args), diffusers_latents("edit", *args))
