"""SDXL through the CLI on a tiny single-file checkpoint (the real key layout, tiny widths): cache-latents,
cache-text, LoRA training and a full fine-tune with --prediction_type flow from the eps checkpoint (the recipe's
conversion), and generation with the trained flow model."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from flowtuner.cli import main
from flowtuner.errors import ConfigError
from tests.sdxl_models import CLIP_G_HIDDEN, CLIP_G_PROJECTION, CLIP_L_HIDDEN, tiny_sdxl, write_single_file
from tests.shared import shared_path


@pytest.fixture
def sdxl(tmp_path):
    tokenizer = shared_path("fixtures/tokenizers/clip")
    ckpt = write_single_file(tmp_path / "tiny_sdxl.safetensors", *tiny_sdxl(0))
    images = tmp_path / "images"
    images.mkdir()
    colours = {"red": (220, 30, 30), "green": (30, 200, 60), "blue": (40, 60, 220), "white": (240, 240, 240)}
    for i, (name, rgb) in enumerate(colours.items()):
        Image.fromarray(np.full((64, 64, 3), rgb, dtype=np.uint8)).save(images / f"{i}.png")
        (images / f"{i}.txt").write_text(f"a {name} square")
    config = tmp_path / "dataset.toml"
    config.write_text(f'[general]\nresolution = 64\ncaption_extension = ".txt"\nbatch_size = 2\n\n'
                      f'[[datasets]]\nimage_directory = "{images}"\ncache_directory = "{tmp_path / "cache"}"\n')
    return {"ckpt": ckpt, "tokenizer": tokenizer, "config": config, "root": tmp_path}


@pytest.mark.slow
def test_sdxl_caches_converts_to_flow_and_generates(sdxl):
    root, model = sdxl["root"], ["--model_version", "sdxl", "--model", str(sdxl["ckpt"])]
    data = ["--dataset_config", str(sdxl["config"]), "--device", "cpu"]
    assert main(["cache-latents", *data, *model]) == 0
    assert main(["cache-text", *data, *model, "--tokenizer", str(sdxl["tokenizer"])]) == 0
    latent = load_file(root / "cache" / "0_0064x0064_sdxl.safetensors")
    assert [(k, tuple(v.shape)) for k, v in latent.items()] == [("latents_1x8x8_bfloat16", (4, 1, 8, 8))]
    text = load_file(root / "cache" / "0_sdxl_te.safetensors")
    assert {k: tuple(v.shape) for k, v in text.items()} == {"prompt_embeds_bfloat16": (77, CLIP_L_HIDDEN + CLIP_G_HIDDEN),
                                                         "pooled_bfloat16": (CLIP_G_PROJECTION,)}

    train = [*data, *model, "--prediction_type", "flow", "--max_train_steps", "2", "--seed", "1", "--learning_rate", "1e-2",
             "--max_data_loader_n_workers", "0"]
    assert main(["train", *train, "--output_dir", str(root / "lora"), "--output_name", "sdxl", "--network_dim", "2"]) == 0
    lora = load_file(root / "lora" / "sdxl.safetensors")
    downs = [k for k in lora if k.endswith("lora_down.weight")]
    assert "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q.lora_down.weight" in downs  # kohya's ldm names
    assert any(float(v.abs().max()) > 0 for k, v in lora.items() if "lora_up" in k)

    assert main(["finetune", *train, "--output_dir", str(root / "full"), "--output_name", "flow", "--save_precision", "fp32"]) == 0
    from flowtuner.families.sdxl.unet import load_unet

    tuned = load_unet(root / "full" / "flow.safetensors").state_dict()  # a whole ldm checkpoint (docs/sdxl.md)
    base = load_unet(sdxl["ckpt"]).state_dict()
    assert set(tuned) == set(base)
    assert not torch.equal(tuned["down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.weight"],
                           base["down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.weight"].float())
    assert all(torch.isfinite(v).all() for v in tuned.values() if v.dtype.is_floating_point)

    generate = ["generate", *model, "--tokenizer", str(sdxl["tokenizer"]), "--prompt", "a red square", "--image_size", "64", "64",
                "--infer_steps", "3", "--guidance_scale", "2.0", "--seed", "5", "--output_type", "latent_images"]
    assert main([*generate, "--prediction_type", "flow", "--save_path", str(root / "out"),
                 "--lora_weight", str(root / "lora" / "sdxl.safetensors")]) == 0
    assert main([*generate, "--save_path", str(root / "out_eps")]) == 0  # the checkpoint as it is: eps
    assert main([*generate, "--prediction_type", "flow", "--dit", str(root / "full" / "flow.safetensors"),
                 "--save_path", str(root / "out_full")]) == 0  # the fine-tuned UNet with the base file's VAE and encoders
    flow, eps = (load_file(next((root / d).glob("*.safetensors")))["latent"] for d in ("out", "out_eps"))
    assert flow.shape == (1, 4, 1, 8, 8) and torch.isfinite(flow).all() and not torch.equal(flow, eps)


def test_prediction_type_resolution(sdxl):
    """Training an SDXL checkpoint defaults to flow (the conversion), its sampler to the recipe's shifted logit-normal;
    eps / v train on the DDPM table with kohya's uniform timesteps; Qwen-Image predicts flow only."""
    from flowtuner.config.generate import GenerateConfig
    from flowtuner.config.train import TrainConfig
    from flowtuner.families import family_for
    from flowtuner.train.loop import Trainer
    from flowtuner.train.objective import OBJECTIVES

    trainer = Trainer(TrainConfig(model_version="sdxl", model=str(sdxl["ckpt"]), seed=1), full=True)
    assert trainer.objective is OBJECTIVES["flow"] and trainer.cfg.timestep_sampling == "qwen_shift"
    eps = Trainer(TrainConfig(model_version="sdxl", model=str(sdxl["ckpt"]), v_parameterization=True), full=True)
    assert eps.objective is OBJECTIVES["v"] and eps.cfg.timestep_sampling == "uniform"
    assert family_for(GenerateConfig(model_version="sdxl")).prediction_type == "eps"
    with pytest.raises(ConfigError, match="Qwen-Image runs flow only"):
        Trainer(TrainConfig(model_version="original", prediction_type="eps"), full=True)
    with pytest.raises(ConfigError, match="--zero_terminal_snr"):
        family_for(GenerateConfig(model_version="sdxl", prediction_type="flow", zero_terminal_snr=True))
