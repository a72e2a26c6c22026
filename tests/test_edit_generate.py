"""`flowtuner generate` with Qwen-Image-Edit models, end to end through the CLI, == diffusers'
QwenImageEditPipeline (v1) and QwenImageEditPlusPipeline (2509 with 1, 2, 3 images; 2511) loaded from the same
files, compared on latents; prompt files with `--ci`; bad input; img2img and LoRAs with an edit model.

Both sides' ~1 MP reference area is shrunk to 128² (the `small_area` fixture of tests/test_edit_dit.py patches
diffusers' calculate_dimensions / VAE_IMAGE_SIZE and flowtuner's edit_sizes.VAE_AREA alike), so the default
output size and the VAE references are ~128² and v1's VL image too; 2509/2511's VL image keeps its real 384² area.
The real area's arithmetic is compared with diffusers' own function in tests/test_edit_dit.py."""

from __future__ import annotations

import copy

import pytest
import torch
from safetensors.torch import load_file

from flowtuner.cli import main
from tests.edit_models import edit_processor, tiny_vl, with_image_positions, write_edit_comfyui_files, write_edit_repo
from tests.reference import QWEN_SCHEDULER
from tests.test_edit_dit import control_image, loud_dit, small_area  # noqa: F401  (small_area: a fixture)

PROMPT, NEGATIVE = "make the circle red", "blurry, low quality"
VERSIONS = ("edit", "edit-2509", "edit-2511")
# control images (W, H): several aspect ratios
CONTROLS = {"a": (160, 96), "b": (128, 128), "c": (96, 224)}


@pytest.fixture(scope="session")
def edit_files(tmp_path_factory, tiny_models, qwen_tokenizer_dir):
    """One tiny Qwen-Image-Edit model set (loud DiT so the references matter, VL model with vision weights) as a
    diffusers repo per version and as ComfyUI single files; the control images as PNG files."""
    root = tmp_path_factory.mktemp("edit")
    vl, vae = tiny_vl(), tiny_models["vae"]
    dits = {v: loud_dit(zero_cond_t=v == "edit-2511") for v in VERSIONS}
    repos = {v: write_edit_repo(v, dits[v], vae, vl, qwen_tokenizer_dir, root / v, QWEN_SCHEDULER) for v in VERSIONS}
    comfy = root / "ComfyUI"
    for v in VERSIONS:
        write_edit_comfyui_files(v, dits[v], vae, vl, comfy)
    images = {}
    for i, (name, size) in enumerate(CONTROLS.items()):
        images[name] = root / f"{name}.png"
        control_image(size, i).save(images[name])
    return {"repos": repos, "comfy": comfy, "images": images, "root": root}


@pytest.fixture(scope="session")
def diffusers_pipes(edit_files, qwen_tokenizer):
    """diffusers' pipelines from the repos' files. The text encoder is the same files read into the class that
    passes M-RoPE image positions (diffusers 0.42.1 on transformers 5 drops them; see test_edit_text.py)."""
    from diffusers import QwenImageEditPipeline, QwenImageEditPlusPipeline

    processor = edit_processor(qwen_tokenizer)
    pipes = {}
    for version, repo in edit_files["repos"].items():
        cls = QwenImageEditPipeline if version == "edit" else QwenImageEditPlusPipeline
        te = with_image_positions().from_pretrained(repo / "text_encoder").eval()
        pipes[version] = cls.from_pretrained(repo, text_encoder=te, processor=processor)
    return pipes


def generate(out, *args, steps: int = 3) -> torch.Tensor:
    """The CLI's latent ([1, 16, 1, h, w]) for these arguments."""
    argv = ["generate", *map(str, args), "--infer_steps", str(steps), "--save_path", str(out), "--device", "cpu",
            "--output_type", "latent"]
    assert main(argv) == 0
    [file] = out.glob("*_latent.safetensors")
    return load_file(file)["latent"]


def reference(pipe, version, images, prompt, seed, cfg=4.0, negative=NEGATIVE, size=None, steps=3) -> torch.Tensor:
    """diffusers' latent, unpacked to [1, 16, 1, h, w]."""
    from PIL import Image

    from flowtuner.families.qwen_image import edit_sizes

    opened = [Image.open(p).convert("RGB") for p in images]
    height, width = size or reversed(edit_sizes.default_output_size(version, [im.size for im in opened]))
    packed = pipe(image=opened[0] if version == "edit" else opened, prompt=prompt,
                  negative_prompt=negative if cfg > 1 else None, true_cfg_scale=cfg, num_inference_steps=steps,
                  height=height, width=width, generator=torch.Generator("cpu").manual_seed(seed),
                  output_type="latent").images
    return pipe._unpack_latents(packed, height, width, pipe.vae_scale_factor)


def assert_close(ours: torch.Tensor, ref: torch.Tensor) -> None:
    assert ours.shape == ref.shape, (ours.shape, ref.shape)
    rel = ((ours - ref).abs().max() / ref.abs().max()).item()
    assert rel <= 1e-3, rel


def control_args(edit_files, names: str) -> list:
    return ["--control_image_path", *(edit_files["images"][n] for n in names)]


# ------------------------------------------------------------------ parity with diffusers
def test_edit_v1_from_repo_matches_diffusers(tmp_path, small_area, edit_files, diffusers_pipes):
    """The version from model_index.json, the output size from the control image, true CFG with a negative prompt."""
    ours = generate(tmp_path, "--model", edit_files["repos"]["edit"], *control_args(edit_files, "a"), "--prompt", PROMPT,
                    "--negative_prompt", NEGATIVE, "--guidance_scale", 4, "--seed", 7)
    ref = reference(diffusers_pipes["edit"], "edit", [edit_files["images"]["a"]], PROMPT, 7)
    assert ours.shape[-2:] == (12, 20)  # 160 x 96: the control's size at the (shrunk) reference area, / 8
    assert_close(ours, ref)


@pytest.mark.slow
@pytest.mark.parametrize("names", ["a", "ab", "abc"], ids=["1image", "2images", "3images"])
def test_edit_2509_from_repo_matches_diffusers(tmp_path, small_area, edit_files, diffusers_pipes, names):
    images = [edit_files["images"][n] for n in names]
    ours = generate(tmp_path, "--model", edit_files["repos"]["edit-2509"], *control_args(edit_files, names),
                    "--prompt", PROMPT, "--negative_prompt", NEGATIVE, "--guidance_scale", 4, "--seed", 11)
    assert_close(ours, reference(diffusers_pipes["edit-2509"], "edit-2509", images, PROMPT, 11))


@pytest.mark.slow
@pytest.mark.parametrize("version", VERSIONS)
def test_explicit_version_and_size_match_diffusers(tmp_path, small_area, edit_files, diffusers_pipes, version):
    """--model_version given, --image_size given, no unconditional pass (guidance 1)."""
    names = "b" if version == "edit" else "ca"
    images = [edit_files["images"][n] for n in names]
    ours = generate(tmp_path, "--model", edit_files["repos"][version], "--model_version", version,
                    *control_args(edit_files, names), "--prompt", PROMPT, "--guidance_scale", 1, "--seed", 3,
                    "--image_size", 48, 80)
    assert_close(ours, reference(diffusers_pipes[version], version, images, PROMPT, 3, cfg=1.0, size=(48, 80)))


@pytest.mark.slow
def test_edit_2511_detected_from_zero_cond_t_matches_diffusers(tmp_path, small_area, edit_files, diffusers_pipes):
    images = [edit_files["images"][n] for n in "ab"]
    ours = generate(tmp_path, "--model", edit_files["repos"]["edit-2511"], *control_args(edit_files, "ab"),
                    "--prompt", PROMPT, "--negative_prompt", NEGATIVE, "--guidance_scale", 4, "--seed", 2)
    assert_close(ours, reference(diffusers_pipes["edit-2511"], "edit-2511", images, PROMPT, 2))


@pytest.mark.slow
@pytest.mark.parametrize("version", VERSIONS)
def test_comfyui_single_files_match_diffusers(tmp_path, small_area, edit_files, diffusers_pipes, version):
    """ComfyUI files: the DiT without config (2511 by its __index_timestep_zero__ marker), the VL model's config
    inferred from its shapes, the tokenizer given."""
    names = "a" if version == "edit" else "ba"  # v1 takes one control image
    images = [edit_files["images"][n] for n in names]
    ours = generate(tmp_path, "--comfyui_dir", edit_files["comfy"], "--model_version", version,
                    "--dit", f"qwen_image_{version.replace('-', '_')}_tiny.safetensors",
                    "--text_encoder", "qwen_2.5_vl_tiny.safetensors", "--vae", "qwen_image_vae_tiny.safetensors",
                    "--tokenizer", edit_files["repos"][version] / "tokenizer",
                    *control_args(edit_files, names), "--prompt", PROMPT, "--negative_prompt", NEGATIVE,
                    "--guidance_scale", 4, "--seed", 5)
    assert_close(ours, reference(diffusers_pipes[version], version, images, PROMPT, 5))


# ------------------------------------------------------------------ prompt files
@pytest.mark.slow
def test_prompt_file_with_ci_lines_equals_the_flags(tmp_path, small_area, edit_files):
    repo, (a, b) = edit_files["repos"]["edit-2509"], (edit_files["images"][n] for n in "ab")
    flags = generate(tmp_path / "flags", "--model", repo, "--control_image_path", a, b, "--prompt", PROMPT,
                     "--negative_prompt", NEGATIVE, "--guidance_scale", 4, "--seed", 9, "--image_size", 64, 96)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(f"{PROMPT} --ci {a} --ci {b} --n {NEGATIVE} --l 4 --d 9 --h 64 --w 96\n")
    from_file = generate(tmp_path / "file", "--model", repo, "--from_file", prompts)
    torch.testing.assert_close(from_file, flags, atol=0, rtol=0)
    # the images are part of the conditioning: the same line with the images swapped is another result
    prompts.write_text(f"{PROMPT} --ci {b} --ci {a} --n {NEGATIVE} --l 4 --d 9 --h 64 --w 96\n")
    swapped = generate(tmp_path / "swapped", "--model", repo, "--from_file", prompts)
    assert (swapped - flags).abs().max() > 1e-2


# ------------------------------------------------------------------ bad input
def one_line_error(capsys, argv) -> str:
    assert main([str(a) for a in argv]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err, err
    return err


def bad_input_cases(edit_files, tiny_files):
    images, repos = edit_files["images"], edit_files["repos"]
    unreadable = edit_files["root"] / "broken.png"
    unreadable.write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    missing = edit_files["root"] / "missing.png"
    return {
        "t2i model": (["--model", tiny_files["repo"], "--model_version", "original", "--control_image_path", images["a"]],
                      "control image"),
        "4 images with 2509": (["--model", repos["edit-2509"], "--control_image_path", *(images[n] for n in "abca")],
                               "got 4"),
        "2 images with v1": (["--model", repos["edit"], "--model_version", "edit", "--control_image_path", images["a"],
                              images["b"]], "got 2"),
        "unreadable": (["--model", repos["edit-2509"], "--control_image_path", unreadable], str(unreadable)),
        "missing": (["--model", repos["edit-2509"], "--control_image_path", images["a"], missing], str(missing)),
    }


@pytest.mark.parametrize("case", ["t2i model", "4 images with 2509", "2 images with v1", "unreadable", "missing"])
def test_bad_control_input_is_one_line_and_writes_nothing(tmp_path, capsys, edit_files, tiny_files, case):
    args, expect = bad_input_cases(edit_files, tiny_files)[case]
    out = tmp_path / "out"
    err = one_line_error(capsys, ["generate", *args, "--prompt", PROMPT, "--save_path", out, "--device", "cpu",
                                  "--infer_steps", 1, "--image_size", 32, 32])
    assert expect in err, err
    assert not out.exists() or not any(out.iterdir())


# ------------------------------------------------------------------ img2img and LoRA with an edit model
@pytest.mark.slow
def test_img2img_with_an_edit_model_runs(tmp_path, small_area, edit_files):
    repo, images = edit_files["repos"]["edit-2509"], edit_files["images"]
    common = ["--model", repo, *control_args(edit_files, "a"), "--prompt", PROMPT, "--seed", 4, "--image_size", 64, 96,
              "--guidance_scale", 4]
    plain = generate(tmp_path / "plain", *common)
    init_b = generate(tmp_path / "b", *common, "--image", images["b"], "--strength", 0.6)
    init_c = generate(tmp_path / "c", *common, "--image", images["c"], "--strength", 0.6)
    assert init_b.shape == plain.shape == (1, 16, 1, 8, 12)
    assert torch.isfinite(init_b).all()
    assert (init_b - plain).abs().max() > 1e-2 and (init_b - init_c).abs().max() > 1e-2


@pytest.mark.slow
def test_lora_merges_into_the_edit_dit_as_diffusers_loads_it(tmp_path, small_area, edit_files, qwen_tokenizer):
    """A kohya-format LoRA on the edit DiT: flowtuner's --lora_weight == diffusers' load_lora_weights."""
    from diffusers import QwenImageEditPlusPipeline

    from flowtuner.train.lora_formats import write_lora_file
    from tests.test_lora import random_lora

    repo, images = edit_files["repos"]["edit-2509"], [edit_files["images"]["a"]]
    pipe = QwenImageEditPlusPipeline.from_pretrained(
        repo, text_encoder=with_image_positions().from_pretrained(repo / "text_encoder").eval(),
        processor=edit_processor(qwen_tokenizer))
    lora = tmp_path / "edit_lora.safetensors"
    write_lora_file(random_lora(copy.deepcopy(pipe.transformer), seed=3).weights(), lora, "kohya")
    base = reference(pipe, "edit-2509", images, PROMPT, 6, size=(64, 64))
    pipe.load_lora_weights(str(lora))
    ref = reference(pipe, "edit-2509", images, PROMPT, 6, size=(64, 64))
    assert (ref - base).abs().max() > 1e-2  # the LoRA matters
    ours = generate(tmp_path / "out", "--model", repo, *control_args(edit_files, "a"), "--prompt", PROMPT,
                    "--negative_prompt", NEGATIVE, "--guidance_scale", 4, "--seed", 6, "--image_size", 64, 64,
                    "--lora_weight", lora)
    assert_close(ours, ref)


@pytest.mark.slow
def test_inpainting_samplers_and_guidance_work_with_an_edit_model(tmp_path, small_area, edit_files):
    """The shared sampling options act on an edit model too: inpainting keeps the unmasked half of the source
    whatever the noise, and other samplers, schedulers and guidance hooks (PAG on the DiT included) run and change
    the result."""
    from PIL import Image

    repo, images = edit_files["repos"]["edit-2509"], edit_files["images"]
    common = ["--model", repo, *control_args(edit_files, "a"), "--prompt", PROMPT, "--image_size", 64, 96,
              "--guidance_scale", 4]
    mask = tmp_path / "mask.png"
    Image.fromarray((torch.arange(96) < 48).repeat(64, 1).numpy().astype("uint8") * 255).save(mask)  # white = change
    inpaint = [*common, "--image", images["b"], "--mask", mask, "--strength", 1.0]
    one, two = generate(tmp_path / "i1", *inpaint, "--seed", 1), generate(tmp_path / "i2", *inpaint, "--seed", 2)
    keep = (slice(None), slice(None), slice(None), slice(None), slice(7, None))  # latent columns under black
    assert torch.allclose(one[keep], two[keep], atol=1e-5) and (one[..., :5] - two[..., :5]).abs().max() > 1e-2
    plain = generate(tmp_path / "plain", *common, "--seed", 3)
    for name, extra in {"sde": ["--sampler", "dpmpp_2m_sde", "--scheduler", "beta"],
                        "apg+cfg_norm": ["--guidance", "apg:eta=0.5", "--guidance", "cfg_norm"],
                        "pag": ["--guidance", "pag:scale=2"]}.items():
        out = generate(tmp_path / name, *common, "--seed", 3, *extra)
        assert torch.isfinite(out).all() and (out - plain).abs().max() > 1e-3, name
