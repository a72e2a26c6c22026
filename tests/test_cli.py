"""`flowtuner generate` from the command line: user errors are one line naming the file, no traceback;
prompt files, seeds, and output files."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from flowtuner.cli import main


def gen_args(tiny_files, out, *extra):
    return ["generate", "--model", str(tiny_files["repo"]), "--save_path", str(out), "--device", "cpu",
            "--image_size", "64", "64", "--infer_steps", "2", "--seed", "5", *extra]


def one_line_error(capsys, argv) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err, err
    return err


@pytest.fixture(scope="module")
def wrong_files(tmp_path_factory, tiny_files):
    d = tmp_path_factory.mktemp("wrong")
    save_file({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(4, 4),
               "conditioner.embedders.0.transformer.text_model.embeddings.token_embedding.weight": torch.zeros(4, 4)},
              d / "sdxl.safetensors")
    dit = next((tiny_files["comfy"] / "models/diffusion_models").glob("qwen_image_tiny.safetensors")).read_bytes()
    (d / "truncated.safetensors").write_bytes(dit[: len(dit) // 2])
    torch.save({"state_dict": {}}, d / "model.ckpt")
    return d


@pytest.mark.parametrize("slot_file,expect", [
    (("--dit", "VAE"), "expected a Qwen-Image DiT, but this looks like a Qwen-Image / Wan-2.1 VAE"),
    (("--dit", "sdxl.safetensors"), "SD 1.x / 2.x UNets are not supported"),  # no SDXL size embedding: detected, refused
    (("--dit", "truncated.safetensors"), "truncated"),
    (("--dit", "model.ckpt"), "pickled PyTorch checkpoint"),
    (("--vae", "DIT"), "expected a Qwen-Image VAE, but this looks like a Qwen-Image DiT"),
    (("--text_encoder", "VAE"), "expected a Qwen2.5-VL text encoder"),
])
def test_wrong_file_for_slot(capsys, tmp_path, tiny_files, wrong_files, slot_file, expect):
    flag, name = slot_file
    comfy = tiny_files["comfy"] / "models"
    path = {"VAE": comfy / "vae/qwen_image_vae_tiny.safetensors",
            "DIT": comfy / "diffusion_models/qwen_image_tiny.safetensors"}.get(name, wrong_files / name)
    err = one_line_error(capsys, gen_args(tiny_files, tmp_path, "--prompt", "x", flag, str(path)))
    assert str(path) in err and expect in err


def test_flag_errors(capsys, tmp_path, tiny_files):
    err = one_line_error(capsys, gen_args(tiny_files, tmp_path, "--prompt", "x", "--image_size", "1000", "1000"))
    assert "multiples of 16; nearest valid: 1008 1008" in err
    assert "no prompt" in one_line_error(capsys, gen_args(tiny_files, tmp_path))
    prompts = tmp_path / "p.txt"
    prompts.write_text("a cat --w 64\n# comment\na dog --x 3\n")
    err = one_line_error(capsys, gen_args(tiny_files, tmp_path, "--from_file", str(prompts)))
    assert f"{prompts}:3: unknown option --x" in err
    err = one_line_error(capsys, gen_args(tiny_files, tmp_path, "--prompt", "x", "--tokenizer", str(tmp_path)))
    assert "not a tokenizer folder" in err
    assert "not a folder" in one_line_error(capsys, ["generate", "--model", str(prompts), "--prompt", "x"])


def test_console_script_prints_no_traceback(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "flowtuner", "generate", "--dit", str(tmp_path / "none.safetensors"),
                           "--prompt", "x", "--text_encoder", str(tmp_path)], capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "none.safetensors: not found" in proc.stderr


def test_from_file_sizes_seeds_and_embedded_parameters(tmp_path, tiny_files):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle --w 96 --h 64 --d 11 --s 3 --l 1.0\n--n blurry --d 20\n")
    out = tmp_path / "out"
    assert main(["generate", "--model", str(tiny_files["repo"]), "--save-path", str(out), "--device", "cpu",
                 "--from-file", str(prompts), "--num-images", "2", "--image-size", "48", "32", "--infer-steps", "2"]) == 0
    images = sorted(out.glob("*.png"))
    assert len(images) == 4
    params = [json.loads(Image.open(p).text["flowtuner"]) for p in images]
    by_seed = {p["seed"]: p for p in params}
    assert set(by_seed) == {11, 12, 20, 21}
    assert by_seed[11]["width"] == 96 and by_seed[11]["height"] == 64 and by_seed[11]["steps"] == 3
    assert by_seed[20]["prompt"] == "" and by_seed[20]["negative_prompt"] == "blurry"
    assert Image.open(out / images[0].name).size in {(96, 64), (32, 48)}
    text = Image.open(images[0]).text["parameters"]
    assert "Steps:" in text and "Seed:" in text and "Sampler: euler" in text


def test_same_seed_twice_never_overwrites(tmp_path, tiny_files):
    for _ in range(2):
        assert main(gen_args(tiny_files, tmp_path, "--prompt", "x", "--output_type", "latent")) == 0
    files = list(tmp_path.glob("*_latent.safetensors"))
    assert len(files) == 2


@pytest.mark.slow
def test_samplers_and_schedulers_from_the_cli_and_prompt_lines(tmp_path, tiny_files, capsys):
    from safetensors.torch import load_file

    latents = {}
    for sampler, scheduler in (("euler", "reference"), ("heun", "simple"), ("dpmpp_2m", "karras"), ("euler_ancestral", "beta")):
        out = tmp_path / f"{sampler}-{scheduler}"
        extra = ["--shift", "3.1"] if scheduler != "reference" else []
        assert main(gen_args(tiny_files, out, "--prompt", "x", "--output_type", "latent", "--sampler", sampler,
                             "--scheduler", scheduler, *extra)) == 0
        path = next(out.glob("*.safetensors"))
        latents[sampler] = load_file(path)["latent"]
        from safetensors import safe_open

        with safe_open(str(path), "pt") as f:
            assert f.metadata()["sampler"] == sampler
    values = list(latents.values())
    assert all((a - b).abs().max() > 1e-4 for i, a in enumerate(values) for b in values[i + 1:])
    prompts = tmp_path / "p.txt"
    prompts.write_text("a cat --sampler lcm --scheduler simple --shift 2.0\n")
    assert main(gen_args(tiny_files, tmp_path / "f", "--from_file", str(prompts), "--output_type", "latent")) == 0
    capsys.readouterr()
    err = one_line_error(capsys, gen_args(tiny_files, tmp_path, "--prompt", "x", "--shift", "3"))
    assert "with the reference scheduler use --flow_shift" in err
