"""flowtuner generate == diffusers QwenImagePipeline on the same tiny weights, through the CLI."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from flowtuner.cli import main
from tests.reference import reference_pipeline, reference_run

PROMPT = "a red circle on a blue background"


def run_cli(tmp_path, *model_args, height, width, cfg, seed, steps=4, prompt=PROMPT):
    out = tmp_path / "out"
    rc = main(["generate", *model_args, "--prompt", prompt, "--image_size", str(height), str(width),
               "--infer_steps", str(steps), "--guidance_scale", str(cfg), "--seed", str(seed),
               "--save_path", str(out), "--output_type", "latent_images", "--device", "cpu"])
    assert rc == 0
    latent = load_file(next(out.glob("*_latent.safetensors")))["latent"]
    image = np.asarray(Image.open(next(out.glob("*.png"))))
    return latent, image


@pytest.fixture(scope="module")
def pipe(tiny_models, qwen_tokenizer):
    return reference_pipeline(tiny_models, qwen_tokenizer)


@pytest.mark.parametrize("height,width", [(64, 96), (112, 48)])
@pytest.mark.parametrize("cfg", [4.0, 1.0])
def test_matches_diffusers_from_hf_repo(tmp_path, tiny_files, pipe, height, width, cfg):
    ref_latent, ref_image = reference_run(pipe, PROMPT, height, width, 4, cfg, seed=7)
    latent, image = run_cli(tmp_path, "--model", str(tiny_files["repo"]), height=height, width=width, cfg=cfg, seed=7)
    assert latent.shape == ref_latent.shape
    assert torch.allclose(latent, ref_latent, atol=1e-4, rtol=0), (latent - ref_latent).abs().max()
    assert np.abs(image.astype(int) - ref_image.astype(int)).max() <= 1


@pytest.mark.parametrize("dit_name", ["qwen_image_tiny.safetensors", "qwen_image_tiny_prefixed.safetensors"])
def test_matches_diffusers_from_comfyui_files(tmp_path, tiny_files, pipe, dit_name):
    ref_latent, ref_image = reference_run(pipe, PROMPT, 64, 96, 4, 4.0, seed=3)
    latent, image = run_cli(
        tmp_path, "--comfyui_dir", str(tiny_files["comfy"]), "--dit", dit_name,
        "--text_encoder", "qwen_2.5_vl_tiny.safetensors", "--vae", "qwen_image_vae_tiny.safetensors",
        "--tokenizer", str(tiny_files["tokenizer"]), height=64, width=96, cfg=4.0, seed=3)
    assert torch.allclose(latent, ref_latent, atol=1e-4, rtol=0), (latent - ref_latent).abs().max()
    assert np.abs(image.astype(int) - ref_image.astype(int)).max() <= 1


def test_outputs_depend_on_prompt_and_guidance(tmp_path, tiny_files):
    """Guards the parity tests against a model too weak for its output to matter."""
    repo = ("--model", str(tiny_files["repo"]))
    a, _ = run_cli(tmp_path / "a", *repo, height=64, width=64, cfg=4.0, seed=1)
    b, _ = run_cli(tmp_path / "b", *repo, height=64, width=64, cfg=4.0, seed=1, prompt="a green square")
    c, _ = run_cli(tmp_path / "c", *repo, height=64, width=64, cfg=1.0, seed=1)
    assert (a - b).abs().max() > 1e-2
    assert (a - c).abs().max() > 1e-2
