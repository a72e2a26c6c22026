"""img2img, inpainting and DifferentialDiffusion through `flowtuner generate`, against diffusers'
QwenImageImg2ImgPipeline / QwenImageInpaintPipeline on the same tiny weights.

diffusers samples the VAE posterior with the run's generator; flowtuner encodes the posterior mean. The
reference runs are therefore handed flowtuner's encoded latents as their `image` (diffusers accepts
latents there), which isolates everything else: the schedule truncation by strength, the start on the
source's path, the mask processing and the per-step blending, CFG."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from flowtuner.cli import main
from tests.reference import reference_edit_pipelines

PROMPT = "a red circle on a blue background"
H, W = 64, 96


@pytest.fixture(scope="module")
def pipes(tiny_models, qwen_tokenizer):
    return reference_edit_pipelines(tiny_models, qwen_tokenizer)


@pytest.fixture(scope="module")
def sources(tmp_path_factory, tiny_files):
    """A random image, a binary mask (white = change: the left half), a soft ramp mask, and the image's
    latents as flowtuner encodes them."""
    from flowtuner.families import get_family
    from flowtuner.init_images import _pixels

    folder = tmp_path_factory.mktemp("sources")
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (H, W, 3), dtype=np.uint8)).save(folder / "image.png")
    mask = np.zeros((H, W), np.uint8)
    mask[:, : W // 2] = 255
    Image.fromarray(mask).save(folder / "mask.png")
    ramp = np.zeros((H, W), np.uint8)  # a black quarter, then a ramp to white
    ramp[:, W // 4 :] = np.linspace(0, 255, W - W // 4).round().astype(np.uint8)
    Image.fromarray(ramp).save(folder / "ramp.png")
    family = get_family("qwen_image")
    codec = family.load_codec(family.resolve_paths(model=tiny_files["repo"]), torch.device("cpu"))
    latents = codec.encode(_pixels(str(folder / "image.png"), "RGB", H, W))
    return {"image": folder / "image.png", "mask": folder / "mask.png", "ramp": folder / "ramp.png", "latents": latents,
            "mask_tensor": torch.from_numpy(mask.astype(np.float32) / 255)[None, None]}


def run_cli(tmp_path, tiny_files, *extra, steps=5, cfg=4.0, seed=7):
    out = tmp_path / "out"
    assert main(["generate", "--model", str(tiny_files["repo"]), "--prompt", PROMPT, "--image_size", str(H), str(W),
                 "--infer_steps", str(steps), "--guidance_scale", str(cfg), "--seed", str(seed), "--device", "cpu",
                 "--save_path", str(out), "--output_type", "latent", *extra]) == 0
    return load_file(next(out.glob("*.safetensors")))["latent"]


def reference(pipe, latents, steps=5, cfg=4.0, seed=7, **kwargs):
    packed = pipe(prompt=PROMPT, negative_prompt=" ", image=latents[:, :, 0], height=H, width=W, num_inference_steps=steps,
                  true_cfg_scale=cfg, generator=torch.Generator("cpu").manual_seed(seed), output_type="latent", **kwargs).images
    return pipe._unpack_latents(packed, H, W, pipe.vae_scale_factor)


@pytest.mark.parametrize("strength", [0.6, 0.35, 1.0])
def test_img2img_matches_diffusers(tmp_path, tiny_files, pipes, sources, strength):
    ours = run_cli(tmp_path, tiny_files, "--image", str(sources["image"]), "--strength", str(strength))
    ref = reference(pipes["img2img"], sources["latents"], strength=strength)
    torch.testing.assert_close(ours, ref, atol=1e-4, rtol=0)
    t2i = run_cli(tmp_path / "t2i", tiny_files)
    if strength == 1:  # the start is pure noise: text-to-image with the same seed
        torch.testing.assert_close(ours, t2i, atol=1e-5, rtol=0)
    else:
        assert (ours - t2i).abs().max() > 1e-2


@pytest.mark.parametrize("strength", [1.0, 0.6])
def test_inpainting_matches_diffusers(tmp_path, tiny_files, pipes, sources, strength):
    ours = run_cli(tmp_path, tiny_files, "--image", str(sources["image"]), "--mask", str(sources["mask"]),
                   "--strength", str(strength))
    ref = reference(pipes["inpaint"], sources["latents"], strength=strength, mask_image=sources["mask_tensor"],
                    masked_image_latents=sources["latents"][:, :, 0])
    torch.testing.assert_close(ours, ref, atol=1e-4, rtol=0)
    half = W // 8 // 2
    torch.testing.assert_close(ours[..., half:], sources["latents"][..., half:], atol=1e-5, rtol=0)  # black: kept
    assert (ours[..., :half] - sources["latents"][..., :half]).abs().mean() > 0.1  # white: changed


def test_differential_diffusion_grows_the_region_as_sigma_falls(tmp_path, tiny_files, sources):
    """A black quarter, then a ramp to white: the black columns (mask 0) keep the source exactly; the change
    grows with the mask value; the result differs from binary inpainting with the same mask."""
    dd = run_cli(tmp_path / "dd", tiny_files, "--image", str(sources["image"]), "--mask", str(sources["ramp"]),
                 "--strength", "1", "--guidance", "differential_diffusion")
    binary = run_cli(tmp_path / "bin", tiny_files, "--image", str(sources["image"]), "--mask", str(sources["ramp"]),
                     "--strength", "1")
    change = (dd - sources["latents"]).abs().mean(dim=(0, 1, 2, 3))  # per latent column
    torch.testing.assert_close(change[:2], torch.zeros(2), atol=1e-5, rtol=0)
    ramp = change[3:]
    assert change[-1] > 0.1 and ramp[: len(ramp) // 2].mean() < ramp[len(ramp) // 2 :].mean()
    assert (dd - binary).abs().max() > 1e-2


def test_differential_diffusion_threshold():
    """ComfyUI's rule on a flow model: threshold = (sigma - sigma_min) / (sigma_0 - sigma_min); strength in
    (0, 1) blends with the soft mask; strength 0 behaves like 1."""
    from flowtuner.guidance.methods import differential_diffusion

    mask = torch.tensor([0.0, 0.25, 0.5, 0.75, 1.0])
    at = differential_diffusion(mask, 1.0, 0.0, {"strength": 1.0})
    assert at(1.0).tolist() == [0, 0, 0, 0, 1] and at(0.5).tolist() == [0, 0, 1, 1, 1] and at(0.0).tolist() == [1] * 5
    assert differential_diffusion(mask, 1.0, 0.0, {"strength": 0.0})(0.5).tolist() == [0, 0, 1, 1, 1]
    half = differential_diffusion(mask, 1.0, 0.0, {"strength": 0.5})(0.5)
    torch.testing.assert_close(half, 0.5 * torch.tensor([0, 0, 1, 1, 1.0]) + 0.5 * mask)
    floor = differential_diffusion(mask, 1.0, 0.2, {"strength": 1.0})
    assert floor(0.6).tolist() == [0, 0, 1, 1, 1]  # (0.6 - 0.2) / 0.8 = 0.5


def test_user_errors_are_one_line(tmp_path, tiny_files, sources, capsys):
    base = ["generate", "--model", str(tiny_files["repo"]), "--prompt", "x", "--device", "cpu", "--save_path", str(tmp_path)]
    cases = {
        ("--mask", str(sources["mask"])): "--mask needs --image",
        ("--strength", "0.5"): "--strength needs --image",
        ("--image", str(tmp_path / "missing.png")): "image not found",
        ("--image", str(sources["image"]), "--strength", "0"): "must be in (0, 1]",
        ("--image", str(sources["image"]), "--guidance", "differential_diffusion"): "needs --image and --mask",
        ("--image", str(sources["image"]), "--strength", "1e-17"): "leaves no step to run",
    }
    for extra, message in cases.items():
        assert main(base + list(extra)) == 2
        err = capsys.readouterr().err.strip()
        assert message in err and "\n" not in err, err


def test_strength_truncation_follows_diffusers_arithmetic():
    from flowtuner.sampling import start_index

    assert start_index(25, 0.56) == 10  # 25 * 0.56 = 14.000000000000002 in floats, as in diffusers
    assert start_index(20, 0.6) == 8 and start_index(5, 0.6) == 2 and start_index(5, 1.0) == 0 and start_index(5, 0.1) == 4
    assert start_index(5, 1e-17) == 5  # nothing left: generate reports it (test_user_errors_are_one_line)
    from types import SimpleNamespace

    from diffusers import FlowMatchEulerDiscreteScheduler, QwenImageImg2ImgPipeline

    for steps in (5, 20, 25, 50):
        sched = FlowMatchEulerDiscreteScheduler()
        sched.set_timesteps(steps)
        for strength in (0.1, 0.35, 0.56, 0.6, 0.7, 0.99, 1.0):
            _, left = QwenImageImg2ImgPipeline.get_timesteps(SimpleNamespace(scheduler=sched), steps, strength, "cpu")
            assert steps - left == start_index(steps, strength), (steps, strength)
