"""LoRA: module selection, file formats both ways, and generation with LoRAs equal to diffusers'."""

from __future__ import annotations

import copy

import pytest
import torch

from flowtuner.cli import main
from flowtuner.errors import ConfigError
from flowtuner.families.qwen_image import QwenImageFamily
from flowtuner.train.lora import LoRANetwork, select_modules
from flowtuner.train.lora_formats import parse_lora, read_lora_file, write_lora_file
from tests.reference import reference_pipeline, reference_run
from tests.test_generate_parity import PROMPT, run_cli

FAMILY = QwenImageFamily()
TABLES = (list(FAMILY.lora_block_modules), list(FAMILY.lora_stem_modules))


def random_lora(dit, paths=None, rank=4, alpha=8.0, seed=0) -> LoRANetwork:
    torch.manual_seed(seed)
    net = LoRANetwork(dit, paths or FAMILY.lora_default_targets(dit), rank, alpha)
    for lora in net.loras.values():
        torch.nn.init.normal_(lora.up.weight, std=0.2)  # non-zero, so the LoRA changes the output
    return net


def test_default_targets_and_patterns(tiny_models):
    dit = tiny_models["dit"]
    default = FAMILY.lora_default_targets(dit)
    assert len(default) == 2 * 12 and not any("_mod." in p for p in default)
    every = [f"transformer_blocks.{i}.{m}" for i in range(2) for m in FAMILY.lora_block_modules]
    assert len(select_modules(dit, every, [], [])) == 28
    for pattern in (r".*(_mod_).*", r".*_mod\.1"):  # kohya-style and dotted patterns both match
        assert set(select_modules(dit, every, [], [pattern])) == set(default)
    with_stems = select_modules(dit, default, ["img_in", "proj_out"], [])
    assert {"img_in", "proj_out"} <= set(with_stems)


@pytest.mark.parametrize("fmt", ["kohya", "diffusers", "comfyui"])
def test_formats_round_trip(tmp_path, tiny_models, fmt):
    net = random_lora(tiny_models["dit"], FAMILY.lora_default_targets(tiny_models["dit"]) + ["img_in", "norm_out.linear"])
    write_lora_file(net.weights(), tmp_path / "l.safetensors", fmt)
    back = read_lora_file(tmp_path / "l.safetensors", *TABLES)
    assert set(back) == set(net.paths)
    for path, w in net.weights().items():
        torch.testing.assert_close(back[path].delta(), w.delta(), atol=1e-6, rtol=1e-5)


def test_other_layouts_parse(tiny_models):
    down, up = torch.randn(2, 128), torch.randn(128, 2)
    path = "transformer_blocks.1.attn.to_add_out"
    bare = parse_lora({f"{path}.lora_down.weight": down, f"{path}.lora_up.weight": up, f"{path}.alpha": torch.tensor(1.0)}, {}, *TABLES, "x")
    peft = parse_lora({f"{path}.lora_A.default.weight": down, f"{path}.lora_B.default.weight": up}, {}, *TABLES, "x")
    assert bare[path].scale == 0.5 and peft[path].scale == 1.0
    with pytest.raises(ConfigError, match="LoHa / LoKr"):
        parse_lora({"lora_unet_transformer_blocks_0_attn_to_q.hada_w1_a": down}, {}, *TABLES, "x.safetensors")
    with pytest.raises(ConfigError, match="matches no module"):
        parse_lora({"lora_unet_transformer_blocks_0_attn_to_zz.lora_down.weight": down,
                    "lora_unet_transformer_blocks_0_attn_to_zz.lora_up.weight": up}, {}, *TABLES, "x")


@pytest.fixture(scope="module")
def lora_file(tmp_path_factory, tiny_models):
    path = tmp_path_factory.mktemp("lora") / "kohya.safetensors"
    net = random_lora(tiny_models["dit"], FAMILY.lora_default_targets(tiny_models["dit"]) + ["transformer_blocks.0.img_mod.1"])
    write_lora_file(net.weights(), path, "kohya")
    return path, net


def test_generate_with_lora_equals_diffusers_load_lora_weights(tmp_path, tiny_files, tiny_models, qwen_tokenizer, lora_file):
    path, _ = lora_file
    models = {**tiny_models, "dit": copy.deepcopy(tiny_models["dit"])}
    pipe = reference_pipeline(models, qwen_tokenizer)
    base_latent, _ = reference_run(pipe, PROMPT, 64, 96, 4, 4.0, seed=2)
    pipe.load_lora_weights(str(path))
    ref_latent, ref_image = reference_run(pipe, PROMPT, 64, 96, 4, 4.0, seed=2)
    assert (ref_latent - base_latent).abs().max() > 1e-2  # the LoRA matters
    latent, image = run_cli(tmp_path, "--model", str(tiny_files["repo"]), "--lora_weight", str(path),
                            height=64, width=96, cfg=4.0, seed=2)
    torch.testing.assert_close(latent, ref_latent, atol=1e-4, rtol=0)


def test_layouts_give_the_same_image_and_multipliers_add(tmp_path, tiny_files, lora_file):
    path, net = lora_file
    repo = ("--model", str(tiny_files["repo"]))
    ref, _ = run_cli(tmp_path / "ref", *repo, "--lora_weight", str(path), height=64, width=64, cfg=4.0, seed=1)
    for fmt in ("diffusers", "comfyui"):
        other = tmp_path / f"{fmt}.safetensors"
        write_lora_file(net.weights(), other, fmt)
        latent, _ = run_cli(tmp_path / fmt, *repo, "--lora_weight", str(other), height=64, width=64, cfg=4.0, seed=1)
        torch.testing.assert_close(latent, ref, atol=1e-5, rtol=0)
    half, _ = run_cli(tmp_path / "half", *repo, "--lora_weight", str(path), str(path), "--lora_multiplier", "0.25", "0.75",
                      height=64, width=64, cfg=4.0, seed=1)
    torch.testing.assert_close(half, ref, atol=1e-5, rtol=0)


def test_save_merged_model(tmp_path, tiny_files, lora_file, capsys):
    path, _ = lora_file
    merged = tmp_path / "merged.safetensors"
    assert main(["generate", "--model", str(tiny_files["repo"]), "--lora_weight", str(path),
                 "--save_merged_model", str(merged)]) == 0
    repo = str(tiny_files["repo"])
    a, _ = run_cli(tmp_path / "a", "--model", repo, "--lora_weight", str(path), height=64, width=64, cfg=1.0, seed=4)
    b, _ = run_cli(tmp_path / "b", "--model", repo, "--dit", str(merged), height=64, width=64, cfg=1.0, seed=4)
    torch.testing.assert_close(a, b, atol=1e-6, rtol=0)
