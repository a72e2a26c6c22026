"""The text-encode, sampler and LoRA nodes in a real headless ComfyUI (tests/comfy_server.py): API-format
workflows loader -> text encode -> sampler -> ComfyUI's SaveLatent, whose file must hold `flowtuner generate
--output_type latent`'s latents for the same files (in ComfyUI's raw latent format; compared after normalising),
and an RGBA image (ComfyUI's JoinImageWithAlpha) refused with our one line while the server stays up."""

from __future__ import annotations

import shutil

import pytest
import torch
from safetensors.torch import load_file

from tests.test_comfyui_nodes import EDIT_PROMPT, NEGATIVE, PROMPT, generate
from tests.test_edit_dit import small_area  # noqa: F401  (fixture)
from tests.test_edit_generate import edit_files  # noqa: F401  (fixture)

pytestmark = pytest.mark.slow
# the server is another process (its own thread count, so its own float summation order) and the latents pass
# through ComfyUI's raw format: measured 2.0e-6 abs / 1.1e-6 rel on the edit workflow, 0 on text to image
LATENT_TOL = dict(atol=1e-5, rtol=0)


def put(server, source, folder: str, name: str) -> str:
    target = server.models / folder / name
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(source, target)
    return name


def with_tokenizer(server, tokenizer_dir) -> None:
    """The tokenizer in text_encoders/tokenizer/, beside the files: where the loader looks first (as the CLI
    finds it), the same files the CLI gets with --tokenizer here."""
    shutil.copytree(tokenizer_dir, server.models / "text_encoders" / "tokenizer", dirs_exist_ok=True)


def saved_latent(server, prefix: str) -> torch.Tensor:
    [file] = (server.output_dir / "latents").glob(f"{prefix}*.latent")
    from flowtuner.comfyui.text import from_comfy_latent

    return from_comfy_latent(load_file(file)["latent_tensor"])


def workflow(dit: str, te: str, version: str, prefix: str, images: dict | None = None, vae: str | None = None,
             seed: int = 5, cfg: float = 4.0) -> dict:
    graph = {
        "1": {"class_type": "flowtunerDiTLoader", "inputs": {"dit_name": dit, "weight_dtype": "default", "model_version": version}},
        "2": {"class_type": "flowtunerTextEncoderLoader", "inputs": {"text_encoder_name": te}},
        "5": {"class_type": "EmptySD3LatentImage", "inputs": {"width": 96, "height": 64, "batch_size": 1}},
        "6": {"class_type": "flowtunerSampler", "inputs": {
            "model": ["1", 0], "positive": ["3", 0], "negative": ["4", 0], "latent_image": ["5", 0], "seed": seed,
            "steps": 3, "cfg": cfg, "sampler": "euler", "scheduler": "reference", "cfg_mode": "norm_rescale",
            "denoise": 1.0, "guidance": "", "flow_shift": 0.0, "options": ""}},
        "7": {"class_type": "SaveLatent", "inputs": {"samples": ["6", 0], "filename_prefix": f"latents/{prefix}"}},
    }
    for node, prompt in (("3", PROMPT if not images else EDIT_PROMPT), ("4", NEGATIVE)):
        graph[node] = {"class_type": "flowtunerTextEncode", "inputs": {"text_encoder": ["2", 0], "prompt": prompt,
                                                                        "model_version": version}}
    if vae:
        graph["8"] = {"class_type": "flowtunerVAELoader", "inputs": {"vae_name": vae}}
    for i, name in enumerate(images or {}):
        graph[f"9{i}"] = {"class_type": "LoadImage", "inputs": {"image": name}}
        for node in ("3", "4"):
            graph[node]["inputs"][f"image{i + 1}"] = [f"9{i}", 0]
            graph[node]["inputs"]["vae"] = ["8", 0]
    return graph


def test_t2i_workflow_equals_generate(comfy_server, tiny_files, tmp_path):
    comfy = tiny_files["comfy"] / "models"
    dit = put(comfy_server, comfy / "diffusion_models" / "qwen_image_tiny.safetensors", "diffusion_models", "wf_t2i.safetensors")
    te = put(comfy_server, comfy / "text_encoders" / "qwen_2.5_vl_tiny.safetensors", "text_encoders", "wf_t2i_te.safetensors")
    with_tokenizer(comfy_server, tiny_files["tokenizer"])
    comfy_server.run(workflow(dit, te, "original", "t2i"), timeout=300)
    ref = generate(tmp_path, "--dit", comfy / "diffusion_models" / "qwen_image_tiny.safetensors", "--text_encoder",
                   comfy / "text_encoders" / "qwen_2.5_vl_tiny.safetensors", "--tokenizer", tiny_files["tokenizer"],
                   "--prompt", PROMPT, "--negative_prompt", NEGATIVE, "--image_size", 64, 96, "--seed", 5,
                   "--guidance_scale", 4)
    torch.testing.assert_close(saved_latent(comfy_server, "t2i"), ref, **LATENT_TOL)


def test_edit_2509_workflow_equals_generate(comfy_server, edit_files, tiny_files, tmp_path, small_area):
    """LoadImage -> flowtuner Text Encode (with the flowtuner VAE: reference latents) -> flowtuner Sampler; the
    reference area shrunk alike in the server (its launcher) and here (small_area): the path, not the size, is tested."""
    comfy = edit_files["comfy"] / "models"
    dit = put(comfy_server, comfy / "diffusion_models" / "qwen_image_edit_2509_tiny.safetensors", "diffusion_models", "wf_edit.safetensors")
    te = put(comfy_server, comfy / "text_encoders" / "qwen_2.5_vl_tiny.safetensors", "text_encoders", "wf_edit_vl.safetensors")
    vae = put(comfy_server, comfy / "vae" / "qwen_image_vae_tiny.safetensors", "vae", "wf_edit_vae.safetensors")
    with_tokenizer(comfy_server, tiny_files["tokenizer"])
    comfy_server.input_dir.mkdir(parents=True, exist_ok=True)
    shutil.copy(edit_files["images"]["a"], comfy_server.input_dir / "wf_a.png")
    comfy_server.run(workflow(dit, te, "edit-2509", "edit", {"wf_a.png": None}, vae, seed=11), timeout=400)
    ref = generate(tmp_path, "--dit", comfy / "diffusion_models" / "qwen_image_edit_2509_tiny.safetensors",
                   "--text_encoder", comfy / "text_encoders" / "qwen_2.5_vl_tiny.safetensors", "--vae",
                   comfy / "vae" / "qwen_image_vae_tiny.safetensors", "--tokenizer", tiny_files["tokenizer"],
                   "--model_version", "edit-2509", "--control_image_path", edit_files["images"]["a"],
                   "--prompt", EDIT_PROMPT, "--negative_prompt", NEGATIVE, "--image_size", 64, 96, "--seed", 11,
                   "--guidance_scale", 4)
    torch.testing.assert_close(saved_latent(comfy_server, "edit"), ref, **LATENT_TOL)


def test_rgba_image_is_refused_in_one_line(comfy_server, edit_files, tiny_files):
    from tests.comfy_server import ComfyRunError

    comfy = edit_files["comfy"] / "models"
    te = put(comfy_server, comfy / "text_encoders" / "qwen_2.5_vl_tiny.safetensors", "text_encoders", "wf_edit_vl.safetensors")
    with_tokenizer(comfy_server, tiny_files["tokenizer"])
    comfy_server.input_dir.mkdir(parents=True, exist_ok=True)
    shutil.copy(edit_files["images"]["a"], comfy_server.input_dir / "wf_a.png")
    graph = {
        "1": {"class_type": "LoadImage", "inputs": {"image": "wf_a.png"}},
        "2": {"class_type": "JoinImageWithAlpha", "inputs": {"image": ["1", 0], "alpha": ["1", 1]}},
        "3": {"class_type": "flowtunerTextEncoderLoader", "inputs": {"text_encoder_name": te}},
        "4": {"class_type": "flowtunerTextEncode", "inputs": {"text_encoder": ["3", 0], "prompt": EDIT_PROMPT,
                                                              "model_version": "edit-2509", "image1": ["2", 0]}},
        "5": {"class_type": "flowtunerConditioningStats", "inputs": {"conditioning": ["4", 0]}},
    }
    with pytest.raises(ComfyRunError) as err:
        comfy_server.run(graph, timeout=200)
    assert str(err.value).startswith("image1 has an alpha channel") and "\n" not in str(err.value)
    assert comfy_server.object_info("flowtunerSampler")  # still serving
