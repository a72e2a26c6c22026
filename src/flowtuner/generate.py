"""Text-to-image generation: encode every distinct prompt once, then sample, then decode. Components
are loaded one after the other and freed, so the text encoder, DiT and VAE are never co-resident."""

from __future__ import annotations

import gc
import logging
import random
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from flowtuner import __version__
from flowtuner.config.generate import GenerateConfig
from flowtuner.config.prompt_lines import read_prompt_file
from flowtuner.errors import ConfigError
from flowtuner.families import get_family
from flowtuner.families.base import Conditioning, Denoiser, Family, ModelPaths
from flowtuner.flow.samplers import SAMPLERS
from flowtuner.guidance import guided_model
from flowtuner.outputs import save_latent, save_png

log = logging.getLogger(__name__)


@dataclass
class Job:
    """One prompt's settings; `num_images` images with seeds seed, seed + 1, ..."""

    prompt: str
    negative_prompt: str | None
    height: int
    width: int
    steps: int
    guidance_scale: float
    flow_shift: float | None
    seed: int
    num_images: int = 1
    sampler: str = "euler"
    scheduler: str = "reference"
    shift: float | None = None
    guidance: tuple[str, ...] = ()


def check_size(height: int, width: int, step: int, flag: str = "--image_size") -> None:
    bad = [v for v in (height, width) if v <= 0 or v % step]
    if bad:
        near = [max(step, int(v / step + 0.5) * step) for v in (height, width)]  # ties round up
        raise ConfigError(f"{flag} {height} {width}: height and width must be positive multiples of {step}; nearest valid: {near[0]} {near[1]}.")


def make_jobs(cfg: GenerateConfig, size_step: int) -> list[Job]:
    base = dict(height=cfg.image_size[0], width=cfg.image_size[1], steps=cfg.infer_steps,
                guidance_scale=cfg.guidance_scale, flow_shift=cfg.flow_shift, negative_prompt=cfg.negative_prompt,
                sampler=cfg.sampler, scheduler=cfg.scheduler, shift=cfg.shift, guidance=tuple(cfg.guidance or ()),
                seed=cfg.seed if cfg.seed is not None else random.randrange(2**31))
    if cfg.from_file:
        lines = read_prompt_file(cfg.from_file)
    elif cfg.prompt is not None:
        lines = [(cfg.prompt, {})]
    else:
        raise ConfigError("no prompt: pass --prompt TEXT or --from_file FILE.")
    jobs = []
    for prompt, overrides in lines:
        job = Job(prompt=prompt, num_images=cfg.num_images, **{**base, **overrides})
        check_size(job.height, job.width, size_step, "--image_size" if "height" not in overrides else "--h/--w")
        if job.steps < 1:
            raise ConfigError(f"steps must be >= 1, got {job.steps}.")
        check_sampling(job)
        if job.guidance_scale > 1 and job.negative_prompt is None:
            job.negative_prompt = " "  # musubi-tuner crashes without one; the reference uses " "
        jobs.append(job)
    return jobs


def check_sampling(job: Job) -> None:
    from flowtuner.flow.schedulers import SCHEDULERS

    if job.sampler not in SAMPLERS:
        raise ConfigError(f"sampler {job.sampler!r}: unknown; choose one of {', '.join(SAMPLERS)}.")
    if job.scheduler != "reference" and job.scheduler not in SCHEDULERS:
        raise ConfigError(f"scheduler {job.scheduler!r}: unknown; choose reference or one of {', '.join(SCHEDULERS)}.")
    if job.scheduler == "reference" and job.shift is not None:
        raise ConfigError("--shift sets the sigma table of the ComfyUI schedulers; with the reference scheduler use --flow_shift.")
    if job.scheduler != "reference" and job.flow_shift is not None:
        raise ConfigError("--flow_shift applies to the reference scheduler; with ComfyUI schedulers use --shift.")
    from flowtuner.guidance.methods import parse_guidance

    for text in job.guidance:
        parse_guidance(text)


def job_sigmas(family: Family, job: Job, geometry) -> torch.Tensor:
    if job.scheduler == "reference":
        return family.default_sigmas(job.steps, geometry, job.flow_shift)
    from flowtuner.flow.model_sampling import aura_flow
    from flowtuner.flow.schedulers import SCHEDULERS

    table = aura_flow(job.shift) if job.shift is not None else family.comfy_model_sampling()
    return SCHEDULERS[job.scheduler](table, job.steps)


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


def encode_prompts(family: Family, paths: ModelPaths, jobs: list[Job], device: torch.device) -> dict[str, Conditioning]:
    """Every distinct prompt and negative prompt, encoded once."""
    texts = [j.prompt for j in jobs] + [j.negative_prompt for j in jobs if j.guidance_scale > 1]
    texts = list(dict.fromkeys(texts))
    encoder = family.load_text_encoder(paths, device)
    conds = {}
    for i in tqdm(range(0, len(texts), 8), desc="encoding prompts", unit="batch", disable=len(texts) <= 8):
        chunk = texts[i : i + 8]
        conds.update(zip(chunk, encoder.encode(chunk)))
    del encoder
    release_cache()
    return conds


@torch.no_grad()
def sample_job(denoiser: Denoiser, family: Family, job: Job, conds: dict[str, Conditioning],
               on_step=None) -> list[tuple[Job, int, torch.Tensor]]:
    geometry = denoiser.geometry(job.height, job.width)
    sigmas = job_sigmas(family, job, geometry)
    uncond = conds.get(job.negative_prompt) if job.guidance_scale > 1 else None
    from flowtuner.guidance.methods import parse_guidance

    model = guided_model(lambda x, s, c: denoiser.predict(x, s, c, geometry), conds[job.prompt], uncond,
                         job.guidance_scale, denoiser.feature_dim,
                         methods=[parse_guidance(t) for t in job.guidance], grid=denoiser.grid(geometry))
    out = []
    for seed in range(job.seed, job.seed + job.num_images):
        x = SAMPLERS[job.sampler](model, denoiser.noise(geometry, seed), sigmas, callback=on_step,
                                  generator=torch.Generator().manual_seed(seed))  # ancestral / LCM noise
        out.append((job, seed, denoiser.to_latents(x, geometry).cpu()))
    return out


def lora_pairs(cfg: GenerateConfig) -> list[tuple[str, float]]:
    files = cfg.lora_weight or []
    mults = cfg.lora_multiplier or [1.0] * len(files)
    if len(mults) != len(files):
        raise ConfigError(f"--lora_multiplier: {len(mults)} values for {len(files)} --lora_weight files.")
    return list(zip(files, mults))


def load_denoiser_with_loras(family: Family, paths: ModelPaths, device, attn_mode: str, loras: list[tuple[str, float]]):
    from flowtuner.train.lora import merge_into
    from flowtuner.train.lora_formats import read_lora_file

    denoiser = family.load_denoiser(paths, device, attn_mode)
    for file, multiplier in loras:
        weights = read_lora_file(file, list(family.lora_block_modules), list(family.lora_stem_modules))
        merge_into(denoiser.module, weights, multiplier)
        log.info("merged LoRA %s (x%s, %d modules)", file, multiplier, len(weights))
    return denoiser


def save_merged(family: Family, paths: ModelPaths, cfg: GenerateConfig) -> Path:
    from flowtuner.weights import atomic_save_safetensors

    denoiser = load_denoiser_with_loras(family, paths, torch.device("cpu"), "torch", lora_pairs(cfg))
    out = Path(cfg.save_merged_model)
    atomic_save_safetensors({k: v for k, v in denoiser.module.state_dict().items()}, out,
                            {"merged_loras": ", ".join(f"{f} x{m}" for f, m in lora_pairs(cfg))})
    return out


def sample_all(family: Family, paths: ModelPaths, jobs: list[Job], conds: dict[str, Conditioning],
               device: torch.device, attn_mode: str, loras: list[tuple[str, float]] = ()) -> list[tuple[Job, int, torch.Tensor]]:
    denoiser = load_denoiser_with_loras(family, paths, device, attn_mode, list(loras))
    with tqdm(total=sum(j.steps * j.num_images for j in jobs), desc="sampling", unit="step") as bar:
        results = [r for job in jobs for r in sample_job(denoiser, family, job, conds, lambda *_: bar.update())]
    del denoiser
    release_cache()
    return results


def params_of(job: Job, seed: int, paths: ModelPaths) -> dict:
    params = {k: v for k, v in asdict(job).items() if k not in ("num_images",)}
    params.update(seed=seed, version=__version__, model=Path(paths.dit).name if paths.dit else "")
    return params


def run(cfg: GenerateConfig, family_name: str = "qwen_image") -> list[Path]:
    family = get_family(family_name)
    paths = family.resolve_paths(dit=cfg.dit, vae=cfg.vae, text_encoder=cfg.text_encoder, tokenizer=cfg.tokenizer,
                                 model=cfg.model, comfyui_dir=cfg.comfyui_dir)
    if cfg.save_merged_model:
        family.validate(paths, ("dit",))
        return [save_merged(family, paths, cfg)]
    jobs = make_jobs(cfg, family.size_step)
    decode = cfg.output_type in ("images", "latent_images")
    family.validate(paths, ("text_encoder", "dit") + (("vae",) if decode else ()))
    device = pick_device(cfg.device)
    conds = encode_prompts(family, paths, jobs, torch.device("cpu") if cfg.text_encoder_cpu else device)
    results = sample_all(family, paths, jobs, conds, device, cfg.attn_mode, lora_pairs(cfg))
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
