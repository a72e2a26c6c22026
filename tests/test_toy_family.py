"""Proof of the family seam: a third family that exists only in this module -- a small conv net on 4-channel
latents, conditioned on token embeddings plus a pooled vector carried in `Conditioning.extra` -- runs
`generate`, `cache-latents`, `cache-text`, LoRA training (and generation with the trained LoRA) and a full
fine-tune through flowtuner's shared code and CLI, registered only by adding rows to the family registry.

Nothing outside this file knows it; if a shared module had to change for it, the seam would be leaking."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from torch import nn

from flowtuner import families
from flowtuner.cli import main
from flowtuner.errors import ConfigError
from flowtuner.families.base import Conditioning, Denoiser, Family, ImageCodec, LatentGeometry, ModelPaths, TextEncoder
from flowtuner.flow.schedules import ShiftLine, reference_sigmas

CHANNELS, WIDTH, TOKENS, VOCAB, FACTOR = 4, 16, 6, 97, 8


class ToyBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(WIDTH, WIDTH)  # the LoRA target
        self.film = nn.Linear(WIDTH, 2 * WIDTH)

    def forward(self, h, c):
        scale, shift = self.film(c).chunk(2, dim=-1)
        y = self.proj(h.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        return h + torch.tanh(y) * (1 + scale[:, :, None, None]) + shift[:, :, None, None]


class ToyNet(nn.Module):
    """x [B, 4, h, w], t [B] (0..1000), tokens [B, L, 16], pooled [B, 16] -> velocity [B, 4, h, w]."""

    def __init__(self):
        super().__init__()
        self.inp = nn.Conv2d(CHANNELS, WIDTH, 3, padding=1)
        self.time = nn.Linear(1, WIDTH)
        self.text = nn.Linear(WIDTH, WIDTH)
        self.pooled = nn.Linear(WIDTH, WIDTH)
        self.blocks = nn.ModuleList(ToyBlock() for _ in range(2))
        self.out = nn.Conv2d(WIDTH, CHANNELS, 3, padding=1)

    def forward(self, x, t, tokens, pooled):
        c = torch.sin(self.time(t[:, None] / 1000)) + self.text(tokens).mean(1) + self.pooled(pooled)
        h = self.inp(x)
        for block in self.blocks:
            h = block(h, c)
        return self.out(h)


class ToyEncoder(TextEncoder):
    def __init__(self, table: torch.Tensor):
        self.table = table

    def encode(self, prompts, images=None):
        out = []
        for prompt in prompts:
            ids = torch.tensor([ord(ch) % VOCAB for ch in prompt[:TOKENS].ljust(TOKENS)])
            embeds = self.table[ids][None]
            out.append(Conditioning(embeds, extra={"pooled": embeds.mean(1)}))
        return out


class ToyDenoiser(Denoiser):
    feature_dim = 1  # channels of the [B, 4, h, w] grid

    def __init__(self, net: ToyNet):
        self.module = net
        self.seen_pooled: list[torch.Size] = []

    def geometry(self, height, width):
        h, w = height // FACTOR, width // FACTOR
        return LatentGeometry(height, width, (CHANNELS, h, w), h * w)

    def noise(self, geometry, seed):
        return torch.randn((1, *geometry.state_shape), generator=torch.Generator().manual_seed(seed))

    def predict(self, x, sigma, cond, geometry):
        pooled = cond.extra["pooled"]  # KeyError if any shared path dropped `extra`
        self.seen_pooled.append(pooled.shape)
        b = x.shape[0]
        t = torch.as_tensor(sigma, dtype=torch.float32).reshape(-1).expand(b) * 1000  # the family's one x1000
        return self.module(x, t, cond.embeds.float().expand(b, -1, -1), pooled.float().expand(b, -1))

    def to_latents(self, x, geometry):
        return x[:, :, None]

    def grid(self, geometry):
        return (lambda x: x), (lambda d: d)

    def from_latents(self, latents):
        return latents[:, :, 0], self.geometry(latents.shape[-2] * FACTOR, latents.shape[-1] * FACTOR)


class ToyCodec(ImageCodec):
    """8x8 average pooling to 3 colour channels plus their mean, and back: exactly invertible on flat blocks."""

    def encode(self, images):
        pooled = torch.nn.functional.avg_pool2d(images * 2 - 1, FACTOR)
        return torch.cat([pooled, pooled.mean(1, keepdim=True)], 1)[:, :, None]

    def decode(self, latents):
        rgb = latents[:, :3, 0].float()
        return ((torch.nn.functional.interpolate(rgb, scale_factor=FACTOR) + 1) / 2).clamp(0, 1).cpu()


class ToyFamily(Family):
    name = "toy"
    size_step = FACTOR
    latent_scale = FACTOR
    cache_arch = "toy"
    architecture = "toy_net"
    lora_block_modules = ("proj",)
    lora_stem_modules = ("inp", "out")
    lora_blocks = "blocks"
    network_module = "networks.lora_toy"
    default_timestep_sampling = "uniform"
    shift_line = ShiftLine(64, 1024, 0.5, 1.0)
    modelspec_architecture = "Toy"
    modelspec_implementation = "tests/test_toy_family.py"
    modelspec_resolution = "64x64"
    text_cache_names = ("embed", "pooled")

    def text_cache_tensors(self, cond):
        return {"embed": cond.embeds[0], "pooled": cond.extra["pooled"][0]}

    def cached_conditioning(self, text, latent_extras):
        return Conditioning(torch.stack([t["embed"] for t in text]), extra={"pooled": torch.stack([t["pooled"] for t in text])})

    def lora_default_targets(self, module):
        return [f"blocks.{i}.proj" for i in range(len(module.blocks))]

    def cache_size_estimate(self, bucket, caption):
        return CHANNELS * bucket[0] * bucket[1] // FACTOR**2 * 2, (TOKENS + 1) * WIDTH * 2

    def text_recipe(self):
        return "toy-chars-v1"

    def resolve_paths(self, **given):
        return ModelPaths(**{k: Path(v) for k, v in given.items() if k in ("dit", "vae", "text_encoder") and v})

    def validate(self, paths, slots):
        for slot in slots:
            if getattr(paths, slot) is None or not getattr(paths, slot).exists():
                raise ConfigError(f"the toy family needs --{slot}.")

    def load_text_encoder(self, paths, device):
        return ToyEncoder(load_file(paths.text_encoder)["table"])

    def load_denoiser(self, paths, device, attn_mode="torch"):
        net = ToyNet()
        net.load_state_dict(load_file(paths.dit))
        ToyFamily.last_denoiser = ToyDenoiser(net.to(device))
        return ToyFamily.last_denoiser

    def load_codec(self, paths, device):
        return ToyCodec()

    def comfy_model_sampling(self):
        from flowtuner.flow.model_sampling import aura_flow

        return aura_flow(2.0)

    def default_sigmas(self, steps, image_tokens, **overrides):
        return reference_sigmas(steps, image_tokens, self.shift_line, overrides.get("flow_shift"), overrides.get("shift_terminal"))


@pytest.fixture
def toy(monkeypatch, tmp_path):
    """The family registered (two registry rows, nothing else), its model files, and a four-image dataset."""
    monkeypatch.setitem(families.FAMILIES, "toy", ToyFamily)
    monkeypatch.setitem(families.VERSIONS, "toy", families.Version("Toy", "toy"))
    torch.manual_seed(0)
    files = {"dit": tmp_path / "toy_net.safetensors", "vae": tmp_path / "toy_vae.safetensors", "te": tmp_path / "toy_te.safetensors"}
    save_file({k: v.contiguous() for k, v in ToyNet().state_dict().items()}, files["dit"])
    save_file({"unused": torch.zeros(1)}, files["vae"])  # the codec has no weights; the cache records the file's identity
    save_file({"table": torch.randn(VOCAB, WIDTH)}, files["te"])
    images = tmp_path / "images"
    images.mkdir()
    colours = {"red": (220, 30, 30), "green": (30, 200, 60), "blue": (40, 60, 220), "white": (240, 240, 240)}
    for i, (name, rgb) in enumerate(colours.items()):
        Image.fromarray(np.full((32, 32, 3), rgb, dtype=np.uint8)).save(images / f"{i}.png")
        (images / f"{i}.txt").write_text(f"{name} square")
    config = tmp_path / "dataset.toml"
    config.write_text(f'[general]\nresolution = 32\ncaption_extension = ".txt"\nbatch_size = 2\n\n'
                      f'[[datasets]]\nimage_directory = "{images}"\ncache_directory = "{tmp_path / "cache"}"\n')
    return {**files, "config": config, "root": tmp_path}


def _model(toy, *slots):
    flags = {"dit": "--dit", "vae": "--vae", "te": "--text_encoder"}
    return ["--model_version", "toy", *[a for s in slots for a in (flags[s], str(toy[s]))]]


def test_toy_family_caches_trains_and_generates_through_the_shared_code(toy):
    root = toy["root"]
    assert main(["cache-latents", "--dataset_config", str(toy["config"]), *_model(toy, "vae"), "--device", "cpu"]) == 0
    assert main(["cache-text", "--dataset_config", str(toy["config"]), *_model(toy, "te"), "--device", "cpu"]) == 0
    latent = load_file(root / "cache" / "0_0032x0032_toy.safetensors")
    assert [(k, tuple(v.shape)) for k, v in latent.items()] == [("latents_1x4x4_bfloat16", (4, 1, 4, 4))]
    text = load_file(root / "cache" / "0_toy_te.safetensors")
    assert {k: tuple(v.shape) for k, v in text.items()} == {"embed_bfloat16": (TOKENS, WIDTH), "pooled_bfloat16": (WIDTH,)}

    train = ["--dataset_config", str(toy["config"]), *_model(toy, "dit"), "--max_train_steps", "2", "--seed", "1",
             "--learning_rate", "1e-2", "--device", "cpu", "--max_data_loader_n_workers", "0"]
    assert main(["train", *train, "--output_dir", str(root / "lora"), "--output_name", "toy", "--network_dim", "2",
                 "--network_module", "networks.lora_toy"]) == 0
    seen = ToyFamily.last_denoiser.seen_pooled
    assert seen and all(shape == (2, WIDTH) for shape in seen)  # the pooled vectors of a batch of 2, from the caches
    lora = load_file(root / "lora" / "toy.safetensors")
    assert sorted(k for k in lora if k.endswith("lora_down.weight")) == [
        "lora_unet_blocks_0_proj.lora_down.weight", "lora_unet_blocks_1_proj.lora_down.weight"]
    assert any(float(v.abs().max()) > 0 for k, v in lora.items() if "lora_up" in k)  # two steps moved the LoRA
    from safetensors import safe_open

    with safe_open(root / "lora" / "toy.safetensors", "pt") as f:
        meta = f.metadata()
    assert meta["ss_network_module"] == "networks.lora_toy" and meta["modelspec.architecture"] == "Toy/lora"

    assert main(["finetune", *train, "--output_dir", str(root / "full"), "--output_name", "toy_full",
                 "--save_precision", "fp32"]) == 0
    tuned = load_file(root / "full" / "toy_full.safetensors")
    assert not torch.equal(tuned["blocks.0.proj.weight"], load_file(toy["dit"])["blocks.0.proj.weight"])

    generate = ["generate", *_model(toy, "dit", "vae", "te"), "--prompt", "red square", "--image_size", "32", "32",
                "--infer_steps", "3", "--guidance_scale", "2.0", "--seed", "5", "--output_type", "latent_images"]
    assert main([*generate, "--save_path", str(root / "out")]) == 0
    assert main([*generate, "--save_path", str(root / "out_lora"), "--lora_weight", str(root / "lora" / "toy.safetensors")]) == 0
    pngs = sorted((root / "out").glob("*.png")) + sorted((root / "out_lora").glob("*.png"))
    assert len(pngs) == 2 and Image.open(pngs[0]).size == (32, 32)
    plain, with_lora = (load_file(next((root / d).glob("*.safetensors")))["latent"] for d in ("out", "out_lora"))
    assert plain.shape == (1, CHANNELS, 1, 4, 4) and not torch.equal(plain, with_lora)


def test_an_unregistered_version_is_one_line(toy, capsys):
    assert main(["sigmas", "--steps", "2", "--model_version", "toy"]) == 0
    assert json.loads(capsys.readouterr().out)["reference"][-1] == 0.0
    assert main(["sigmas", "--steps", "2", "--model_version", "toy2"]) == 2
    err = capsys.readouterr().err.strip()
    assert "--model_version toy2: unknown model version; choose one of" in err and "toy" in err and "\n" not in err
