"""The SDXL adapter: one checkpoint (or a diffusers folder) holding the UNet, the VAE and both CLIP encoders; the
denoiser runs it as a flow model whatever it predicts (denoiser.py), so every shared sampler, guidance method and
the training loop serve it unchanged.

Choices this family makes (docs/sdxl.md):
- Model files: `--model PATH` (a single-file checkpoint or a diffusers folder) fills every slot; `--dit`, `--vae`,
  `--text_encoder` replace one component (e.g. a fixed VAE). Without --model, a --dit checkpoint fills the others,
  as SDXL checkpoints carry all four models.
- Sizes: multiples of 64 px (the recipe's and kohya's SDXL bucket step; the UNet itself needs 32).
- Prediction types: flow, eps, v. Generation defaults to eps (what an ordinary SDXL checkpoint predicts); training
  defaults to flow: an eps checkpoint trained so becomes a rectified-flow model (the bigASP v2.5 conversion).
- The shift line is flat at mu = ln 3: SDXL has no resolution-dependent shift, and the model-shift training sampler
  (`qwen_shift`, the default) then draws the recipe's shifted logit-normal sigmoid(N(ln 3, 1)) at every size.
"""

from __future__ import annotations

import hashlib
import math
from pathlib import Path

import torch

from flowtuner.errors import ConfigError, FlowtunerError
from flowtuner.families.base import Conditioning, Family, ModelPaths, PromptVariants
from flowtuner.families.paths import comfyui_root, require
from flowtuner.families.sdxl.codec import SDXLCodec
from flowtuner.families.sdxl.denoiser import LATENT_CHANNELS, VAE_FACTOR, SDXLDenoiser, parametrisation
from flowtuner.flow.convention import flow_sigma
from flowtuner.flow.schedules import ShiftLine

#: the recipe's training shift (bigASP v2.5: FlowMatchEulerDiscreteScheduler(shift=3)), as a flat mu line
TRAIN_SHIFT = 3.0
SHIFT_LINE = ShiftLine(base_len=256, max_len=4096, base_shift=math.log(TRAIN_SHIFT), max_shift=math.log(TRAIN_SHIFT))
#: ModelSamplingSD3's default shift: the flow model's sigma table and reference schedule without --flow_shift / --shift
FLOW_SHIFT = 3.0
TEXT_WIDTH = 2048  # CLIP-L 768 + bigG 1280 per token
POOLED_WIDTH = 1280
CHUNK = 77

# diffusers' EulerDiscreteScheduler as stabilityai/stable-diffusion-xl-base-1.0 configures it
EULER_CONFIG = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                    steps_offset=1, timestep_spacing="leading", interpolation_type="linear", use_karras_sigmas=False)
DIFFUSERS_PREDICTION = {"eps": "epsilon", "v": "v_prediction"}

# the Linears of one BasicTransformerBlock (attn1 self, attn2 cross, GEGLU feed-forward)
TRANSFORMER_LINEARS = ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0", "attn2.to_q", "attn2.to_k",
                       "attn2.to_v", "attn2.to_out.0", "ff.net.0.proj", "ff.net.2")
# (blocks path, blocks, attentions per block) of UNet2DConditionModel, bounds wide enough for SDXL (3 up attentions,
# 10 transformer layers); the table of LoRA paths a file's kohya names are read back with
_ATTENTION_SITES = (("down_blocks", 4, 2), ("up_blocks", 4, 3))
_MAX_LAYERS = 10

SLOT_COMPONENTS = {"dit": ("unet",), "vae": ("vae",), "text_encoder": ("clip_l", "clip_g")}
# slot -> ComfyUI model folders a bare file name is looked up in
COMFY_FOLDERS = {"model": ("checkpoints",), "dit": ("checkpoints", "diffusion_models", "unet"),
                 "vae": ("vae", "checkpoints"), "text_encoder": ("checkpoints", "clip", "text_encoders")}


def _attentions() -> list[str]:
    out = [f"{blocks}.{i}.attentions.{j}" for blocks, n, per in _ATTENTION_SITES for i in range(n) for j in range(per)]
    return out + ["mid_block.attentions.0"]


def lora_paths() -> list[str]:
    """Every LoRA-able Linear path an SDXL-structured UNet2DConditionModel can have."""
    out = []
    for att in _attentions():
        out += [f"{att}.proj_in", f"{att}.proj_out"]
        out += [f"{att}.transformer_blocks.{k}.{m}" for k in range(_MAX_LAYERS) for m in TRANSFORMER_LINEARS]
    return out


class SDXLFamily(Family):
    name = "sdxl"
    size_step = 64
    latent_scale = VAE_FACTOR
    cache_arch = "sdxl"
    architecture = "sdxl"
    modelspec_architecture = "stable-diffusion-xl-v1-base"
    modelspec_implementation = "https://github.com/Stability-AI/generative-models"
    modelspec_resolution = "1024x1024"

    lora_block_modules = TRANSFORMER_LINEARS
    lora_stem_modules = ()
    lora_blocks = "transformer_blocks"
    network_module = "networks.lora"  # kohya's module for SD / SDXL
    shift_line = SHIFT_LINE
    default_timestep_sampling = "qwen_shift"  # the model's own (flat) shift: the recipe's shifted logit-normal

    prediction_types = ("eps", "v", "flow")
    train_prediction_type = "flow"
    prediction_type = "eps"
    zsnr = False

    text_cache_names = ("prompt_embeds", "pooled")
    #: batches are homogeneous in the prompt's chunk count (77 k tokens), as the recipe buckets them
    batch_group_tensors = ("prompt_embeds",)

    @property
    def base_model_version(self) -> str:
        return "sdxl_base_v1-0"  # kohya's ss_base_model_version for SDXL

    def configure(self, cfg) -> None:
        self.zsnr = bool(getattr(cfg, "zero_terminal_snr", False))
        if self.prediction_type != "flow":
            self.default_timestep_sampling = "uniform"  # kohya's randint over the DDPM table

    # ------------------------------------------------------------------ caches
    def text_cache_tensors(self, cond: Conditioning) -> dict[str, torch.Tensor]:
        return {"prompt_embeds": cond.embeds[0], "pooled": cond.extra["pooled"][0]}

    prompt_recipe = "bigasp-v2.5"  # families/sdxl/prompts.py

    def prompt_variants(self, item, count: int, seed: int, encoder) -> PromptVariants:
        """The bigASP v2.5 recipe's prompts from the item's caption / tags / score, all encoded at the item's
        chunk-count bucket (a tag prompt is sized to fill it; a shorter one, or an empty UCG prompt, is padded)."""
        from flowtuner.families.sdxl.prompts import PromptBuilder, recipe_item

        tokenizer = encoder.tokens.tokenizer
        if getattr(self, "_builder", None) is None or self._builder.tokenizer is not tokenizer:
            self._builder = PromptBuilder(tokenizer)  # kept: it memoises token counts per tag
        n, prompts = self._builder.variants(recipe_item(item), item.key, seed, count)
        return PromptVariants(prompts, {"chunks": n})

    def cached_conditioning(self, text: list[dict[str, torch.Tensor]], latent_extras: list[dict[str, torch.Tensor]]) -> Conditioning:
        lengths = {t["prompt_embeds"].shape[0] for t in text}
        if len(lengths) > 1:  # CLIP has no mask: prompts of different chunk counts cannot share a batch
            raise FlowtunerError(f"an SDXL batch mixes prompts of {sorted(n // CHUNK for n in lengths)} chunks; "
                                 "use batch_size 1 or captions of the same chunk count.")
        extra = {"pooled": torch.stack([t["pooled"] for t in text])}
        for name in ("original_size", "crop_top_left"):  # micro-conditioning, when a latent cache recorded it
            if all(name in e for e in latent_extras) and latent_extras:
                extra[name] = torch.stack([e[name] for e in latent_extras])
        return Conditioning(torch.stack([t["prompt_embeds"] for t in text]), extra=extra)

    def cache_size_estimate(self, bucket: tuple[int, int], caption: str) -> tuple[int, int]:
        latent = LATENT_CHANNELS * (bucket[0] // VAE_FACTOR) * (bucket[1] // VAE_FACTOR) * 2
        chunks = min(3, len(caption) // 300 + 1)  # ~4 characters per token, 75 tokens per chunk
        return latent + 512, chunks * CHUNK * TEXT_WIDTH * 2 + POOLED_WIDTH * 2 + 512

    def text_recipe(self) -> str:
        from flowtuner.families.sdxl import text

        recipe = f"clip-l+bigg|chunks{text.CHUNK_TOKENS}x{text.MAX_CHUNKS}|penultimate|pooled-first-chunk|comfy-weights"
        return hashlib.sha256(recipe.encode()).hexdigest()[:16]

    # ------------------------------------------------------------------ LoRA
    def lora_names(self) -> tuple[list[str], dict[str, str], str]:
        """kohya's SDXL names (ldm UNet paths, lora_te1_ / lora_te2_) as a table: families/sdxl/lora.py."""
        from flowtuner.families.sdxl.lora import kohya_names

        return [], kohya_names(), self.lora_blocks

    def lora_default_targets(self, module: torch.nn.Module) -> list[str]:
        """The Linears of every transformer of the UNet (attention, feed-forward, proj_in / proj_out): what kohya's
        networks.lora trains in an SDXL UNet."""
        from flowtuner.families.sdxl.lora import unet_lora_paths

        names = set(unet_lora_paths())
        return [n for n, m in module.named_modules() if n in names and isinstance(m, torch.nn.Linear)]

    text_loras = True  # kohya's lora_te1_ / lora_te2_ modules

    def full_state(self, module: torch.nn.Module, cfg, state: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """A whole ldm single-file checkpoint (families/sdxl/save.py): what ComfyUI and A1111 load."""
        from flowtuner.families.sdxl.save import full_state

        return full_state(self, module, cfg, state)

    def fsdp_units(self, module: torch.nn.Module) -> list[torch.nn.Module]:
        """Every attention (Transformer2DModel) and resnet of the down, mid and up blocks, as bigASP wrapped the UNet;
        the samplers, time embedding and conv_in / conv_out stay in the root."""
        blocks = [*module.down_blocks, module.mid_block, *module.up_blocks]
        return [unit for block in blocks for part in ("attentions", "resnets") for unit in getattr(block, part, None) or ()]

    def lora_parts(self, weights: dict) -> tuple[dict, dict]:
        from flowtuner.families.sdxl.lora import text_parts

        unet, _ = text_parts(weights)
        return unet, {p: w for p, w in weights.items() if p not in unet}

    def merge_text_lora(self, encoder, weights: dict, multiplier: float, source: str) -> None:
        from flowtuner.families.sdxl.lora import merge_text

        merge_text({"clip_l": encoder.clip_l, "clip_g": encoder.clip_g}, weights, multiplier, source)

    # ------------------------------------------------------------------ files
    def resolve_paths(self, dit=None, vae=None, text_encoder=None, tokenizer=None, model=None, comfyui_dir=None, **_) -> ModelPaths:
        comfy = comfyui_root(comfyui_dir)
        root = _find("model", model, comfy)
        dit_path = _find("dit", dit, comfy)
        whole = root or dit_path
        return ModelPaths(dit=dit_path or root, vae=_find("vae", vae, comfy) or whole,
                          text_encoder=_find("text_encoder", text_encoder, comfy) or whole,
                          tokenizer=Path(tokenizer) if tokenizer else None, comfyui_dir=comfy,
                          model_root=root if root is not None and root.is_dir() else None)

    def validate(self, paths: ModelPaths, slots: tuple[str, ...]) -> None:
        from flowtuner.families.sdxl.checkpoint import find_component
        from flowtuner.families.sdxl.detect import check

        if "dit" in slots:
            check(require(paths, "dit"))  # a Qwen DiT, SD 1.5, the refiner: one line before anything loads
        for slot in slots:
            for component in SLOT_COMPONENTS[slot]:
                find_component(require(paths, slot), component)

    def load_text_encoder(self, paths: ModelPaths, device: torch.device):
        from flowtuner.families.sdxl.text import SdxlTextEncoder
        from flowtuner.families.sdxl.text_models import load_text_encoders
        from flowtuner.families.sdxl.tokenizer import load_tokenizer

        te = require(paths, "text_encoder")
        near = [Path(p) for p in (te, paths.model_root, paths.dit) if p is not None]
        clip_l, clip_g = load_text_encoders(te, device, torch.float32)  # frozen; fp32 as the recipe runs them
        return SdxlTextEncoder(clip_l, clip_g, load_tokenizer(paths.tokenizer, near, paths.comfyui_dir))

    def load_denoiser(self, paths: ModelPaths, device: torch.device, attn_mode: str = "torch") -> SDXLDenoiser:
        from flowtuner.families.sdxl.unet import load_unet

        if attn_mode not in ("torch", "sdpa"):
            raise ConfigError(f"--attn_mode {attn_mode}: the SDXL UNet runs PyTorch SDPA only (torch / sdpa).")
        return SDXLDenoiser(load_unet(require(paths, "dit"), device), parametrisation(self.prediction_type, self.zsnr))

    def load_codec(self, paths: ModelPaths, device: torch.device) -> SDXLCodec:
        from flowtuner.families.sdxl.vae import load_vae

        return SDXLCodec(load_vae(require(paths, "vae"), device, torch.float32))

    # ------------------------------------------------------------------ sampling
    def comfy_model_sampling(self):
        """flow: ModelSamplingSD3 (shift 3, its node default; the sampler's x1000 is the denoiser's); eps / v:
        ModelSamplingDiscrete (zsnr with --zero_terminal_snr)."""
        from flowtuner.flow.discrete import discrete
        from flowtuner.flow.model_sampling import aura_flow

        return aura_flow(FLOW_SHIFT) if self.prediction_type == "flow" else discrete(zsnr=self.zsnr)

    def default_sigmas(self, steps: int, image_tokens: int, **overrides: float) -> torch.Tensor:
        """diffusers' own schedulers: flow, FlowMatchEulerDiscreteScheduler(shift=--flow_shift, default 3); eps / v,
        EulerDiscreteScheduler as SDXL base configures it (leading spacing), its VE sigmas moved to the flow path."""
        unused = sorted(k for k in ("base_shift", "max_shift", "shift_terminal") if k in overrides)
        if unused:
            raise ConfigError(f"{', '.join('--' + k for k in unused)}: SDXL's schedule has no dynamic shift or terminal; "
                              "use --flow_shift (flow models).")
        if self.prediction_type == "flow":
            from diffusers import FlowMatchEulerDiscreteScheduler

            sched = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=overrides.get("flow_shift", FLOW_SHIFT))
            sched.set_timesteps(steps)
            return sched.sigmas.to(torch.float32).cpu()
        if "flow_shift" in overrides:
            raise ConfigError("--flow_shift shifts a flow model's schedule; an eps / v model's comes from the DDPM table.")
        from diffusers import EulerDiscreteScheduler

        sched = EulerDiscreteScheduler(**EULER_CONFIG, prediction_type=DIFFUSERS_PREDICTION[self.prediction_type],
                                       rescale_betas_zero_snr=self.zsnr)
        sched.set_timesteps(steps)
        return flow_sigma(sched.sigmas.to(torch.float64)).to(torch.float32).cpu()


def _find(slot: str, given, comfy: Path | None) -> Path | None:
    if given is None:
        return None
    path = Path(given)
    if path.exists():
        return path
    tried = [str(path)]
    if comfy is not None and not path.is_absolute():
        for sub in COMFY_FOLDERS[slot]:
            cand = comfy / "models" / sub / path
            if cand.exists():
                return cand
            tried.append(str(cand))
    raise FlowtunerError(f"--{slot} {given}: not found (looked at {', '.join(tried)}).")
