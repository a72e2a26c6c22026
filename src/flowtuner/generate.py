"""Text-to-image generation: encode every distinct prompt once, then sample, then decode. Components
are loaded one after the other and freed, so the text encoder, DiT and VAE are never co-resident."""

from __future__ import annotations

import gc
import logging
import random
from dataclasses import asdict
from pathlib import Path

import torch
from tqdm import tqdm

from flowtuner import __version__
from flowtuner.config.generate import GenerateConfig
from flowtuner.config.prompt_lines import read_prompt_file
from flowtuner.config.sampling import sampling_fields
from flowtuner.errors import ConfigError
from flowtuner.families import family_for
from flowtuner.families.base import Conditioning, Family, ModelPaths
from flowtuner.init_images import encode_init_images, init_key, needs_codec, read_image_size
from flowtuner.outputs import save_latent, save_png
from flowtuner import conditioning
from flowtuner.weights.fp8 import fp8_scaled, fp8_text_encoder
from flowtuner.guidance import runs_uncond
from flowtuner.sampling import InitImage, Job, check_sampling, check_size, sample_job, step_count

log = logging.getLogger(__name__)


DEFAULT_SIZE = (1024, 1024)


def make_jobs(cfg: GenerateConfig, family: Family) -> list[Job]:
    base = {name: getattr(cfg, name) for name in sampling_fields()}
    base.update(steps=cfg.infer_steps, guidance_scale=cfg.guidance_scale, negative_prompt=cfg.negative_prompt,
                image=cfg.image, mask=cfg.mask, strength=cfg.strength, control_images=cfg.control_image_path,
                seed=cfg.seed if cfg.seed is not None else random.randrange(2**31))
    if cfg.from_file:
        lines = read_prompt_file(cfg.from_file)
    elif cfg.prompt is not None:
        lines = [(cfg.prompt, {})]
    else:
        raise ConfigError("no prompt: pass --prompt TEXT or --from_file FILE.")
    jobs = []
    size_step = family.size_step
    for prompt, overrides in lines:
        settings = {**base, **overrides}
        family.check_controls(len(settings.get("control_images") or ()))
        size = default_size(cfg.image_size, settings.get("image"), size_step, family, settings.get("control_images"))
        settings.setdefault("height", size[0])
        settings.setdefault("width", size[1])
        job = Job(prompt=prompt, num_images=cfg.num_images, **settings)
        check_size(job.height, job.width, size_step, "--image_size" if "height" not in overrides else "--h/--w")
        check_sampling(job)
        if runs_uncond(job.guidance_scale, job.guidance_methods()) and job.negative_prompt is None:
            job.negative_prompt = " "  # musubi-tuner crashes without one; the reference uses " "
        jobs.append(job)
    return jobs


def default_size(image_size: list[int] | None, image: str | None, step: int, family: Family | None = None,
                 controls: list[str] | None = None) -> tuple[int, int]:
    """--image_size, else the family's size for the control images (an edit model: diffusers' rule), else the
    --image's size floored to multiples of `step`, else 1024 x 1024."""
    if image_size:
        return image_size[0], image_size[1]
    from_controls = family.default_image_size([read_image_size(c) for c in controls]) if family and controls else None
    if from_controls:
        return from_controls
    if image:
        width, height = read_image_size(image)
        return max(step, height // step * step), max(step, width // step * step)
    return DEFAULT_SIZE


def pick_device(name: str | None) -> torch.device:
    if name:
        return torch.device(name)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def release_cache() -> None:
    """Return freed GPU memory to the driver between components. The components themselves are
    freed by reference counting when the caller drops them (tests/test_generate_memory.py checks
    that); a full gc.collect() costs ~0.2 s per call and is only worth it where GPU memory is at stake."""
    if torch.cuda.is_available():
        gc.collect()
        torch.cuda.empty_cache()


def encode_prompts(family: Family, paths: ModelPaths, jobs: list[Job], device: torch.device,
                   loras: list[tuple[str, float]] = ()) -> dict[tuple, Conditioning]:
    """Every distinct (prompt or negative prompt, control images), encoded once; the text-encoder modules of
    `loras` (file, multiplier) merged first."""
    encoder = family.load_text_encoder(paths, device)
    if loras and family.text_loras:
        merge_text_loras(family, encoder, loras)
    conds = conditioning.encode(encoder, conditioning.keys_of(jobs, family), family)
    del encoder
    release_cache()
    return conds


def merge_text_loras(family: Family, encoder, loras: list[tuple[str, float]]) -> None:
    from flowtuner.train.lora_formats import read_lora_file

    for file, multiplier in loras:
        _, text = family.lora_parts(read_lora_file(file, *family.lora_names()))
        if text:
            family.merge_text_lora(encoder, text, multiplier, f"--lora_weight {file}")


def lora_pairs(cfg: GenerateConfig) -> list[tuple[str, float]]:
    files = cfg.lora_weight or []
    mults = cfg.lora_multiplier or [1.0] * len(files)
    if len(mults) != len(files):
        raise ConfigError(f"--lora_multiplier: {len(mults)} values for {len(files)} --lora_weight files.")
    return list(zip(files, mults))


def load_denoiser_with_loras(family: Family, paths: ModelPaths, device, attn_mode: str, loras: list[tuple[str, float]],
                             fp8: bool = False, blocks_to_swap: int = 0):
    """With `fp8` (--fp8_base) the LoRAs stay unmerged, applied by forward hooks in float32: merging into fp8
    weights re-rounds the LoRA's change (measured: 1.5x its error, docs/memory.md "fp8 base"). With
    `blocks_to_swap` the DiT loads on the host, LoRAs merge there, then the blocks spread over host and device."""
    from flowtuner.train.lora import LoRANetwork, merge_into
    from flowtuner.train.lora_formats import read_lora_file
    from flowtuner.weights.block_swap import enable
    from flowtuner.weights.fp8 import fp8_base

    with fp8_base(fp8):
        denoiser = family.load_denoiser(paths, torch.device("cpu") if blocks_to_swap else device, attn_mode)
    unmerged = []
    for file, multiplier in loras:
        weights, _ = family.lora_parts(read_lora_file(file, *family.lora_names()))  # text modules: encode_prompts
        source = f"--lora_weight {file}"
        if fp8:
            unmerged.append((LoRANetwork.from_weights(denoiser.module, weights, source), multiplier))
        else:
            merge_into(denoiser.module, weights, multiplier, source=source)
        log.info("%s LoRA %s (x%s, %d modules)", "applied (unmerged)" if fp8 else "merged", file, multiplier, len(weights))
    if blocks_to_swap:
        enable(denoiser, blocks_to_swap, device)
    for network, multiplier in unmerged:
        network.to(denoiser.device).attach().set_multiplier(multiplier)
    return denoiser


def save_merged(family: Family, paths: ModelPaths, cfg: GenerateConfig) -> Path:
    from flowtuner.weights import atomic_save_safetensors

    from flowtuner.train.lora_formats import read_lora_file

    for file, _ in lora_pairs(cfg):
        if family.lora_parts(read_lora_file(file, *family.lora_names()))[1]:
            raise ConfigError(f"--save_merged_model: {file} has text-encoder modules, which a merged file would lose "
                              "(only the denoiser is merged); pass --lora_weight at generation instead.")
    denoiser = load_denoiser_with_loras(family, paths, torch.device("cpu"), "torch", lora_pairs(cfg))
    out = Path(cfg.save_merged_model)
    # the family's file layout: the state dict (Qwen-Image), an ldm single file with VAE and text encoders (SDXL)
    atomic_save_safetensors(dict(family.full_state(denoiser.module, cfg)), out,
                            {"merged_loras": ", ".join(f"{f} x{m}" for f, m in lora_pairs(cfg))})
    return out


def sample_all(family: Family, paths: ModelPaths, jobs: list[Job], conds: dict[tuple, Conditioning],
               device: torch.device, attn_mode: str, loras: list[tuple[str, float]] = (),
               inits: dict[tuple, InitImage] | None = None, fp8: bool = False,
               blocks_to_swap: int = 0) -> list[tuple[Job, int, torch.Tensor]]:
    denoiser = load_denoiser_with_loras(family, paths, device, attn_mode, list(loras), fp8, blocks_to_swap)
    inits = inits or {}
    total = sum(step_count(family, j, denoiser.geometry(j.height, j.width).image_tokens) * j.num_images for j in jobs)
    with tqdm(total=total, desc="sampling", unit="step") as bar:
        results = [r for job in jobs
                   for r in sample_job(denoiser, family, job, conds, lambda *_: bar.update(), inits.get(init_key(job)))]
    del denoiser
    release_cache()
    return results


def params_of(job: Job, seed: int, paths: ModelPaths) -> dict:
    params = {k: v for k, v in asdict(job).items() if k != "num_images" and not k.startswith("_")}
    params.update(seed=seed, version=__version__, model=Path(paths.dit).name if paths.dit else "")
    return params


def run(cfg: GenerateConfig, family: Family | None = None) -> list[Path]:
    family = family or family_for(cfg)
    paths = family.resolve_paths(dit=cfg.dit, vae=cfg.vae, text_encoder=cfg.text_encoder, tokenizer=cfg.tokenizer,
                                 model=cfg.model, comfyui_dir=cfg.comfyui_dir)
    if cfg.save_merged_model:
        if cfg.fp8_base:
            raise ConfigError("--save_merged_model with --fp8_base: the merged DiT is saved in the file's precision; "
                              "drop --fp8_base (it only lowers the memory of a generation).")
        family.validate(paths, ("dit",))
        return [save_merged(family, paths, cfg)]
    jobs = make_jobs(cfg, family)
    decode = cfg.output_type in ("images", "latent_images")
    codec_first = needs_codec(jobs) or conditioning.needs_controls(jobs)
    family.validate(paths, ("text_encoder", "dit") + (("vae",) if decode or codec_first else ()))
    device = pick_device(cfg.device)
    with fp8_text_encoder(cfg.fp8_vl):
        conds = encode_prompts(family, paths, jobs, torch.device("cpu") if cfg.text_encoder_cpu else device, lora_pairs(cfg))
    inits = {}
    if codec_first:
        codec = family.load_codec(paths, device)
        inits = encode_init_images(codec, jobs)
        conds = conditioning.with_controls(family, conds, codec)
        del codec
        release_cache()
    with fp8_scaled(cfg.fp8_scaled):
        results = sample_all(family, paths, jobs, conds, device, cfg.attn_mode, lora_pairs(cfg), inits, cfg.fp8_base,
                             cfg.blocks_to_swap)
    out_dir, written = Path(cfg.save_path), []
    if cfg.output_type in ("latent", "latent_images"):
        written += [save_latent(lat, out_dir, params_of(job, seed, paths)) for job, seed, lat in results]
    if decode:
        codec = family.load_codec(paths, device)
        for job, seed, lat in tqdm(results, desc="decoding", unit="image", disable=len(results) < 2):
            written.append(save_png(codec.decode(lat)[0], out_dir, params_of(job, seed, paths)))
        del codec
        release_cache()
    return written
