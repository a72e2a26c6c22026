"""The Qwen-Image adapter: loaders plus the denoiser that owns packing and the sigma -> DiT input."""

from __future__ import annotations

import hashlib
import importlib.util
from dataclasses import replace
from pathlib import Path

import torch

from flowtuner.errors import FlowtunerError
from flowtuner.families.base import Conditioning, Denoiser, Family, LatentGeometry, ModelPaths
from flowtuner.families.paths import require, resolve_paths
from flowtuner.families.qwen_image.dit import DiTInfo, inspect_dit, load_dit
from flowtuner.families.qwen_image.pag import identity_self_attention
from flowtuner.families.qwen_image.text_encoder import (
    MAX_PROMPT_TOKENS, T2I_TEMPLATE, QwenTextEncoder, language_model_view, load_text_model,
)
from flowtuner.families.qwen_image.tokenizer import load_tokenizer
from flowtuner.families.qwen_image.vae import QwenImageCodec, diffusers_view, load_vae
from flowtuner.flow.schedules import ShiftLine, reference_sigmas
from flowtuner.weights.reader import open_checkpoint

VALIDATORS = {"dit": inspect_dit, "text_encoder": language_model_view, "vae": diffusers_view}

# Qwen/Qwen-Image's scheduler config: the dynamic shift line and the terminal sigma
SHIFT_LINE = ShiftLine(base_len=256, max_len=8192, base_shift=0.5, max_shift=0.9)
SHIFT_TERMINAL = 0.02
LATENT_CHANNELS = 16
TEXT_WIDTH = 3584  # Qwen2.5-VL-7B hidden size
VAE_FACTOR = 8
PATCH = 2

LORA_BLOCK_MODULES = (
    "attn.to_q", "attn.to_k", "attn.to_v", "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj", "attn.to_out.0",
    "attn.to_add_out", "img_mlp.net.0.proj", "img_mlp.net.2", "txt_mlp.net.0.proj", "txt_mlp.net.2", "img_mod.1", "txt_mod.1",
)
LORA_STEM_MODULES = ("img_in", "txt_in", "proj_out", "norm_out.linear", "time_text_embed.timestep_embedder.linear_1",
                     "time_text_embed.timestep_embedder.linear_2")

# --attn_mode -> (diffusers attention backend, the package it needs)
ATTN_BACKENDS: dict[str, tuple[str, str | None]] = {
    "torch": ("native", None), "sdpa": ("native", None),
    "flash": ("flash", "flash_attn"), "sage": ("sage", "sageattention"), "sageattn": ("sage", "sageattention"),
    "xformers": ("xformers", "xformers"),
}


def pack(latents: torch.Tensor) -> torch.Tensor:
    """[B, C, 1, h, w] -> [B, (h/2)(w/2), C*4]; feature index c*4 + dy*2 + dx."""
    b, c, _, h, w = latents.shape
    x = latents.reshape(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack(tokens: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Inverse of `pack` for latent height h and width w."""
    b, _, f = tokens.shape
    x = tokens.reshape(b, h // 2, w // 2, f // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, f // 4, 1, h, w)


def collate(conds: list[Conditioning]) -> Conditioning:
    """Stack per-prompt conditionings; pad with zeros and mask only when lengths differ."""
    if len(conds) == 1:
        return conds[0]
    lengths = [c.embeds.shape[1] for c in conds]
    width = max(lengths)
    embeds = torch.cat([torch.nn.functional.pad(c.embeds, (0, 0, 0, width - c.embeds.shape[1])) for c in conds])
    if min(lengths) == width:
        return Conditioning(embeds)
    mask = torch.stack([torch.arange(width) < n for n in lengths]).long()
    return Conditioning(embeds, mask)


class QwenImageDenoiser(Denoiser):
    feature_dim = -1  # packed tokens: the 64 features of one 2x2 latent patch

    def __init__(self, dit, info: DiTInfo | None = None):
        self.dit = self.module = dit
        self.info = info

    @property
    def dtype(self) -> torch.dtype:  # read each time: full fine-tuning recasts the model
        return next(self.dit.parameters()).dtype

    @property
    def device(self) -> torch.device:
        return next(self.dit.parameters()).device

    def geometry(self, height: int, width: int) -> LatentGeometry:
        h, w = height // VAE_FACTOR, width // VAE_FACTOR
        tokens = (h // PATCH) * (w // PATCH)
        return LatentGeometry(height, width, (1, tokens, LATENT_CHANNELS * PATCH * PATCH), tokens)

    def noise(self, geometry: LatentGeometry, seed: int) -> torch.Tensor:
        """Drawn as diffusers' QwenImagePipeline draws it for `Generator("cpu").manual_seed(seed)`:
        shape [1, 1, 16, h, w] in the model dtype on the CPU, then packed."""
        h, w = geometry.height // VAE_FACTOR, geometry.width // VAE_FACTOR
        gen = torch.Generator("cpu").manual_seed(seed)
        eps = torch.randn((1, 1, LATENT_CHANNELS, h, w), generator=gen, dtype=self.dtype)
        return pack(eps.reshape(1, LATENT_CHANNELS, 1, h, w)).to(torch.float32)

    def predict(self, x: torch.Tensor, sigma: torch.Tensor, cond: Conditioning, geometry: LatentGeometry) -> torch.Tensor:
        return self.run_dit([x], [self.target_grid(geometry)], sigma, cond)

    @staticmethod
    def target_grid(geometry: LatentGeometry) -> tuple[int, int, int]:
        return (1, geometry.height // VAE_FACTOR // PATCH, geometry.width // VAE_FACTOR // PATCH)

    def run_dit(self, parts: list[torch.Tensor], grids: list[tuple], sigma: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        """The DiT on the packed token runs `parts` (the sampler state first, then any clean image tokens) with
        their `grids`; returns the output for the first part only, in float32."""
        b = parts[0].shape[0]
        param = next(self.dit.parameters())
        device, dtype = param.device, param.dtype
        # The DiT takes sigma in [0, 1] and scales by 1000 inside its timestep embedding: sigma is
        # passed as is, in float32 (diffusers rounds sigma*1000 to the latent dtype first).
        timestep = torch.as_tensor(sigma, dtype=torch.float32, device=device).reshape(-1).expand(b)
        mask = cond.mask.to(device) if cond.mask is not None else None
        v = self.dit(
            hidden_states=torch.cat([p.to(device, dtype) for p in parts], dim=1),
            encoder_hidden_states=cond.embeds.to(device, dtype).expand(b, -1, -1),
            encoder_hidden_states_mask=mask,
            timestep=timestep,
            img_shapes=[list(grids)] * b,
            return_dict=False,
        )[0]
        return v[:, : parts[0].shape[1]].to(torch.float32)

    def to_latents(self, x: torch.Tensor, geometry: LatentGeometry) -> torch.Tensor:
        return unpack(x, geometry.height // VAE_FACTOR, geometry.width // VAE_FACTOR)

    def grid(self, geometry: LatentGeometry) -> tuple:
        h, w = geometry.height // VAE_FACTOR, geometry.width // VAE_FACTOR
        return (lambda x: unpack(x, h, w)[:, :, 0]), (lambda d: pack(d.unsqueeze(2)))

    def from_latents(self, latents: torch.Tensor) -> tuple[torch.Tensor, LatentGeometry]:
        h, w = latents.shape[-2:]
        return pack(latents), self.geometry(h * VAE_FACTOR, w * VAE_FACTOR)

    def perturbed_attention(self, blocks: str):
        return identity_self_attention(self.dit, blocks)

    def swap_blocks(self) -> torch.nn.ModuleList:
        return self.dit.transformer_blocks


def set_attention(dit, attn_mode: str) -> None:
    if attn_mode not in ATTN_BACKENDS:
        raise FlowtunerError(f"--attn_mode {attn_mode}: unknown; choose one of {', '.join(ATTN_BACKENDS)}.")
    backend, package = ATTN_BACKENDS[attn_mode]
    if package and importlib.util.find_spec(package) is None:
        raise FlowtunerError(f"--attn_mode {attn_mode} needs the '{package}' package, which is not installed (pip install {package}).")
    if backend != "native":
        dit.set_attention_backend(backend)


class QwenImageFamily(Family):
    name = "qwen_image"
    size_step = VAE_FACTOR * PATCH
    latent_scale = VAE_FACTOR
    cache_arch = "qi"
    architecture = "qwen_image"
    modelspec_architecture = "Qwen-Image"
    modelspec_implementation = "https://github.com/QwenLM/Qwen-Image"
    modelspec_resolution = "1328x1328"

    lora_block_modules = LORA_BLOCK_MODULES
    lora_stem_modules = LORA_STEM_MODULES
    lora_blocks = "transformer_blocks"
    network_module = "networks.lora_qwen_image"
    shift_line = SHIFT_LINE
    default_timestep_sampling = "qwen_shift"  # the shift of Qwen-Image's own schedule at each resolution (docs/training.md)

    text_cache_names = ("varlen_vl_embed",)  # musubi-tuner's key: [L, D], the valid tokens after the template cut

    def text_cache_tensors(self, cond: Conditioning) -> dict[str, torch.Tensor]:
        return {"varlen_vl_embed": cond.embeds[0]}

    def cached_conditioning(self, text: list[dict[str, torch.Tensor]], latent_extras: list[dict[str, torch.Tensor]]) -> Conditioning:
        return collate([Conditioning(t["varlen_vl_embed"][None]) for t in text])

    def lora_default_targets(self, module: torch.nn.Module) -> list[str]:
        """Every block Linear, the modulation layers img_mod.1 / txt_mod.1 included: what musubi-tuner's
        networks.lora_qwen_image trains (its pattern meant to exclude them never matches), so the same flags
        give the same LoRA (docs/training.md)."""
        n = len(module.get_submodule(self.lora_blocks))
        return [f"{self.lora_blocks}.{i}.{name}" for i in range(n) for name in LORA_BLOCK_MODULES]

    def cache_size_estimate(self, bucket: tuple[int, int], caption: str) -> tuple[int, int]:
        latent = LATENT_CHANNELS * (bucket[0] // VAE_FACTOR) * (bucket[1] // VAE_FACTOR) * 2
        tokens = min(MAX_PROMPT_TOKENS, len(caption) // 4 + 1) + 5  # ~4 characters per token, + template suffix
        return latent + 512, tokens * TEXT_WIDTH * 2 + 512

    def text_recipe(self) -> str:
        return hashlib.sha256(f"{T2I_TEMPLATE}|cut-after-user|max{MAX_PROMPT_TOKENS}|last-hidden".encode()).hexdigest()[:16]

    def resolve_paths(self, **given) -> ModelPaths:
        return resolve_paths(**given)

    def validate(self, paths: ModelPaths, slots: tuple[str, ...]) -> None:
        for slot in slots:
            VALIDATORS[slot](open_checkpoint(require(paths, slot)))

    def load_text_encoder(self, paths: ModelPaths, device: torch.device) -> QwenTextEncoder:
        te_path = require(paths, "text_encoder")
        near = [p for p in (te_path, paths.model_root, paths.dit) if p is not None]
        tokenizer = load_tokenizer(paths.tokenizer, [Path(p) for p in near], paths.comfyui_dir)
        return QwenTextEncoder(load_text_model(te_path, device), tokenizer)

    def load_denoiser(self, paths: ModelPaths, device: torch.device, attn_mode: str = "torch") -> QwenImageDenoiser:
        dit, info = load_dit(require(paths, "dit"), device)
        set_attention(dit, attn_mode)
        return QwenImageDenoiser(dit, info)

    def load_codec(self, paths: ModelPaths, device: torch.device) -> QwenImageCodec:
        return QwenImageCodec(load_vae(require(paths, "vae"), device))

    def split_attention(self, module: torch.nn.Module) -> None:
        from flowtuner.families.qwen_image.attention import split_attention

        split_attention(module)

    def plan_spec(self, paths: ModelPaths | None):
        from flowtuner.families.qwen_image.plan import plan_spec

        return plan_spec(self, paths, QwenImageDenoiser, self.modelspec_architecture)

    def comfy_model_sampling(self):
        from flowtuner.flow.model_sampling import flux

        return flux(1.15)  # ComfyUI: Qwen-Image is a FLUX-type model with shift (mu) 1.15

    def default_sigmas(self, steps: int, image_tokens: int, **overrides: float) -> torch.Tensor:
        """diffusers' FlowMatchEulerDiscreteScheduler as Qwen/Qwen-Image configures it."""
        line = replace(self.shift_line, **{k: overrides[k] for k in ("base_shift", "max_shift") if k in overrides})
        return reference_sigmas(steps, image_tokens, line, overrides.get("flow_shift"),
                                 overrides.get("shift_terminal", SHIFT_TERMINAL))
