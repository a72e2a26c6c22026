"""One image job, from its settings to latents: the sigma schedule, the guided model, img2img / inpainting,
the sampler. Shared by `flowtuner generate` and training previews; model-agnostic (the family supplies the
denoiser and its defaults)."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import NamedTuple

import torch

from flowtuner.conditioning import cond_keys
from flowtuner.config.sampling import CFG_MODES, MODEL_SAMPLINGS, SamplingConfig, ScheduleConfig
from flowtuner.errors import ConfigError
from flowtuner.families.base import Conditioning, Denoiser, Family
from flowtuner.flow.discrete import DiscreteSampling
from flowtuner.flow.model_sampling import SigmaTable
from flowtuner.flow.samplers import FLOW, SAMPLERS, VE, Noising
from flowtuner.guidance import guided_model
from flowtuner.guidance.methods import LAYOUT_DIFFERS, LAYOUTS, METHODS, parse_guidance
from flowtuner.guidance.masks import masked_model

# ComfyUI's node defaults when --model_sampling names a node but --shift is not given
NODE_SHIFT = {"aura_flow": 1.73, "sd3": 3.0}


@dataclass(kw_only=True)
class Job(SamplingConfig):
    """One prompt's settings; `num_images` images with seeds seed, seed + 1, ..."""

    prompt: str
    negative_prompt: str | None = None
    height: int
    width: int
    steps: int
    guidance_scale: float
    seed: int
    num_images: int = 1
    image: str | None = None  # img2img / inpainting source
    mask: str | None = None  # white = change
    strength: float | None = None  # None: diffusers' default, 0.6
    control_images: list[str] | None = None  # edit models: the control images, in order
    _methods: list | None = field(default=None, init=False, repr=False, compare=False)

    def guidance_methods(self) -> list[tuple[str, dict]]:
        """--guidance parsed (and validated) once per job: (name, params) in the order given."""
        if self._methods is None:
            self._methods = [parse_guidance(t) for t in self.guidance or ()]
        return self._methods


def check_size(height: int, width: int, step: int, flag: str = "--image_size") -> None:
    bad = [v for v in (height, width) if v <= 0 or v % step]
    if bad:
        near = [max(step, int(v / step + 0.5) * step) for v in (height, width)]  # ties round up
        raise ConfigError(f"{flag} {height} {width}: height and width must be positive multiples of {step}; nearest valid: {near[0]} {near[1]}.")


def _choice(flag: str, value: str, valid) -> None:
    if value not in valid:
        raise ConfigError(f"{flag} {value!r}: unknown; choose one of {', '.join(valid)}.")


def _given(flags: dict) -> list[str]:
    return [name for name, value in flags.items() if value is not None]


def check_schedule(cfg: ScheduleConfig) -> None:
    """Reject settings that would be silently ignored by the chosen scheduler."""
    from flowtuner.flow.schedulers import SCHEDULERS

    _choice("--scheduler", cfg.scheduler, ("reference", *SCHEDULERS))
    _choice("--model_sampling", cfg.model_sampling, MODEL_SAMPLINGS)
    comfy_only = {"--shift": cfg.shift, "--mu": cfg.mu, "--model_sampling": None if cfg.model_sampling == "default" else cfg.model_sampling}
    reference_only = {"--flow_shift": cfg.flow_shift, "--shift_terminal": cfg.shift_terminal}
    if cfg.scheduler == "reference" and _given(comfy_only):
        raise ConfigError(f"{', '.join(_given(comfy_only))}: only for the sigma table of the ComfyUI schedulers; with the reference "
                          "scheduler use --flow_shift, --base_shift/--max_shift, --shift_terminal.")
    if cfg.scheduler != "reference" and _given(reference_only):
        raise ConfigError(f"{', '.join(_given(reference_only))}: only for the reference scheduler; with ComfyUI schedulers use "
                          "--model_sampling with --shift, --mu or --base_shift/--max_shift.")
    dynamic = cfg.base_shift is not None or cfg.max_shift is not None
    if cfg.flow_shift is not None and dynamic:
        raise ConfigError("--flow_shift replaces the dynamic shift; drop --base_shift/--max_shift or --flow_shift.")
    if cfg.scheduler != "reference":
        kind = comfy_kind(cfg)
        if cfg.shift is not None and kind not in ("aura_flow", "sd3"):
            raise ConfigError(f"--shift sets an AuraFlow/SD3 table; --model_sampling {kind} does not use it.")
        if (cfg.mu is not None or dynamic) and kind != "flux":
            raise ConfigError(f"--mu / --base_shift / --max_shift set a Flux table; --model_sampling {kind} does not use them.")
        if cfg.mu is not None and dynamic:
            raise ConfigError("--mu fixes the Flux exponent; drop --base_shift/--max_shift or --mu.")


def check_sampling(job: Job) -> None:
    _choice("--sampler", job.sampler, tuple(SAMPLERS))
    _choice("--cfg_mode", job.cfg_mode, CFG_MODES)
    check_schedule(job)
    if job.steps < 1:
        raise ConfigError(f"steps must be >= 1, got {job.steps}.")
    methods = job.guidance_methods()
    if job.strength is not None and not 0 < job.strength <= 1:
        raise ConfigError(f"--strength {job.strength}: must be in (0, 1].")
    if job.strength is not None and not job.image:
        raise ConfigError("--strength needs --image: it says how much of that image to change.")
    if job.mask and not job.image:
        raise ConfigError("--mask needs --image: the mask says which parts of that image to change.")
    if any(METHODS[n].stage == "mask" for n, _ in methods) and not job.mask:
        raise ConfigError("--guidance differential_diffusion needs --image and --mask (a soft mask, white = change).")
    _choice("--guidance_layout", job.guidance_layout, tuple(LAYOUTS))
    if job.guidance_layout != "grid" and not any(n in LAYOUT_DIFFERS for n, _ in methods):
        raise ConfigError(f"--guidance_layout {job.guidance_layout}: changes only --guidance {', '.join(LAYOUT_DIFFERS)}, and this "
                          "prompt uses none of them; add one or drop the flag.")


def comfy_kind(cfg: ScheduleConfig) -> str:
    if cfg.model_sampling != "default":
        return cfg.model_sampling
    if cfg.shift is not None:
        return "aura_flow"
    if cfg.mu is not None or cfg.base_shift is not None or cfg.max_shift is not None:
        return "flux"
    return "default"


def comfy_table(family: Family, cfg: ScheduleConfig, height: int, width: int):
    """The sigma table ComfyUI's schedulers read, as the ModelSampling* node would install it."""
    from flowtuner.flow.model_sampling import aura_flow, flux, flux_mu

    kind = comfy_kind(cfg)
    if kind == "default":
        return family.comfy_model_sampling()
    if kind in NODE_SHIFT:  # ModelSamplingSD3's x1000 timestep multiplier is the family's business here
        return aura_flow(cfg.shift if cfg.shift is not None else NODE_SHIFT[kind])
    if cfg.mu is not None:
        return flux(cfg.mu)
    given = {"base_shift": cfg.base_shift, "max_shift": cfg.max_shift}  # the others: ModelSamplingFlux's defaults
    return flux(flux_mu(height, width, **{k: v for k, v in given.items() if v is not None}))


class Schedule(NamedTuple):
    sigmas: torch.Tensor  # ending in 0
    floor: float  # the smallest sigma the model sampling knows: DifferentialDiffusion's floor (0 for reference)
    sampling: SigmaTable  # the active model sampling, as ComfyUI's samplers see it (the SDE samplers' first sigma)


def schedule(family: Family, cfg: ScheduleConfig, steps: int, height: int, width: int, image_tokens: int) -> Schedule:
    """The sigmas and the model sampling they run under. The reference schedule runs under the family's own
    ComfyUI model sampling, as ComfyUI runs custom sigmas on a model that no ModelSampling node patched."""
    from flowtuner.flow.schedulers import SCHEDULERS

    if cfg.scheduler == "reference":
        overrides = {"flow_shift": cfg.flow_shift, "base_shift": cfg.base_shift, "max_shift": cfg.max_shift,
                     "shift_terminal": cfg.shift_terminal}
        sigmas = family.default_sigmas(steps, image_tokens, **{k: v for k, v in overrides.items() if v is not None})
        return Schedule(sigmas, 0.0, family.comfy_model_sampling())
    table = comfy_table(family, cfg, height, width)
    floor = float(table.flow_sigmas(torch.tensor([table.sigma_min]))[0])
    return Schedule(table.flow_sigmas(SCHEDULERS[cfg.scheduler](table, steps)), floor, table)


def start_index(steps: int, strength: float) -> int:
    """diffusers' img2img truncation, float arithmetic included (N = 25, strength 0.56 starts at step 10, not 11)."""
    init = min(steps * strength, steps)
    return int(max(steps - init, 0))


def job_sigmas(family: Family, job: Job, image_tokens: int) -> Schedule:
    planned = schedule(family, job, job.steps, job.height, job.width, image_tokens)
    if not job.image:
        return planned
    sigmas = planned.sigmas[start_index(len(planned.sigmas) - 1, effective_strength(job)):]
    if len(sigmas) < 2:  # only where N x strength vanishes in float arithmetic
        raise ConfigError(f"--strength {job.strength} with {job.steps} steps leaves no step to run; raise either.")
    return planned._replace(sigmas=sigmas)


def effective_strength(job: Job) -> float:
    return 0.6 if job.strength is None else job.strength


def step_count(family: Family, job: Job, image_tokens: int) -> int:
    return len(job_sigmas(family, job, image_tokens).sigmas) - 1


@dataclass
class InitImage:
    """img2img source latents (the VAE's layout) and the inpainting mask (1 = change) broadcast to them."""

    latents: torch.Tensor
    mask: torch.Tensor | None = None


def mask_function(job: Job, mask: torch.Tensor, sigmas: torch.Tensor, floor: float) -> Callable[[float], torch.Tensor]:
    methods = [(n, p) for n, p in job.guidance_methods() if METHODS[n].stage == "mask"]
    if not methods:
        binary = (mask >= 0.5).to(torch.float32)  # diffusers binarises the mask at 0.5
        return lambda sigma: binary
    if len(methods) > 1:
        raise ConfigError("--guidance: one mask method at a time.")
    (name, params), = methods
    return METHODS[name].fn(mask.to(torch.float32), float(sigmas[0]), max(floor, float(sigmas[-1])), params)


@dataclass(frozen=True)
class SamplerSpace:
    """The coordinates the samplers integrate in, as ComfyUI picks them from the model sampling: flow models on the
    flow path x = (1 - s) x0 + s eps; discrete (VP) models in variance-exploding space x = x0 + s eps, where the
    stochastic and multistep samplers' updates differ from flow coordinates (Euler alone is the same in both).
    `to_flow(s)` -> (flow sigma, x_flow / x) at the space's sigma s; `sigma(f)` the space's sigma at flow sigma f.
    Denoisers keep one convention (flow in, flow velocity out): `model` converts around them, so guidance hooks
    see the space's x and sigma exactly as ComfyUI's do."""

    noising: Noising
    to_flow: Callable[[float], tuple[float, float]]
    sigma: Callable[[float], float]
    identity: bool = False  # the flow path itself: nothing to convert (not even by float rounding)

    def sigmas(self, flow_sigmas: torch.Tensor) -> torch.Tensor:
        if self.identity:
            return flow_sigmas
        return torch.tensor([self.sigma(float(f)) for f in flow_sigmas.double()], dtype=torch.float32)

    def state(self, x_flow: torch.Tensor, flow_sigma: float) -> torch.Tensor:
        return x_flow if self.identity else x_flow / self.to_flow(self.sigma(flow_sigma))[1]

    def flow_state(self, x: torch.Tensor, sigma: float) -> torch.Tensor:
        return x if self.identity else x * self.to_flow(sigma)[1]

    def model(self, predict: Callable) -> Callable:
        """predict(x_flow, flow sigma, *args) -> v  =>  the space's (x - D) / s at (x, s)."""
        if self.identity:
            return predict

        def in_space(x: torch.Tensor, sigma, *args) -> torch.Tensor:
            s = float(sigma)
            f, scale = self.to_flow(s)
            x_flow = x * scale
            denoised = x_flow - f * predict(x_flow, torch.tensor(f, dtype=torch.float64), *args).to(torch.float32)
            return (x - denoised) / s

        return in_space

    def flow_model(self, model: Callable) -> Callable:
        """The inverse of `model`: a model of the space as one on the flow path (the inpainting wrapper's view)."""
        if self.identity:
            return model

        def on_flow(x_flow: torch.Tensor, sigma) -> torch.Tensor:
            f = float(sigma)
            s = self.sigma(f)
            x = x_flow / self.to_flow(s)[1]
            denoised = x - s * model(x, torch.tensor(s)).to(torch.float32)
            return (x_flow - denoised) / f

        return on_flow


FLOW_SPACE = SamplerSpace(FLOW, lambda s: (s, 1.0), lambda f: f, identity=True)
# x_VE = x0 + s eps = x_flow (1 + s) at flow sigma s / (1 + s); flow sigma 1 (pure noise) has no VE sigma
VE_SPACE = SamplerSpace(VE, lambda s: (s / (1 + s), 1 / (1 + s)), lambda f: f / (1 - f) if f < 1 else float("inf"))
#: model-sampling class -> where ComfyUI's samplers run it (any other: the flow path)
SPACES: dict[type, SamplerSpace] = {DiscreteSampling: VE_SPACE}


def sampler_space(sampling: SigmaTable) -> SamplerSpace:
    return SPACES.get(type(sampling), FLOW_SPACE)


def model_patches(denoiser: Denoiser, job: Job) -> ExitStack:
    """The --guidance methods that patch the model itself (FreeU), entered for the whole run."""
    stack = ExitStack()
    for name, params in job.guidance_methods():
        if METHODS[name].stage == "model":
            stack.enter_context(METHODS[name].fn(denoiser, params))
    return stack


def records_attention(denoiser: Denoiser) -> bool:
    """Whether the denoiser's family records self-attention (SAG reads it); the base class only refuses."""
    return type(denoiser).record_self_attention is not Denoiser.record_self_attention


@torch.no_grad()
def sample_job(denoiser: Denoiser, family: Family, job: Job, conds: dict[tuple, Conditioning], on_step=None,
               init: InitImage | None = None) -> list[tuple[Job, int, torch.Tensor]]:
    geometry = denoiser.geometry(job.height, job.width)
    sigmas, floor, sampling = job_sigmas(family, job, geometry.image_tokens)
    key, negative = cond_keys(job, family)
    uncond = conds[negative] if negative is not None else None
    hooks = [m for m in job.guidance_methods() if METHODS[m[0]].stage not in ("mask", "model")]
    space = sampler_space(sampling)
    model = guided_model(space.model(lambda x, s, c: denoiser.predict(x, s, c, geometry)), conds[key], uncond,
                         job.guidance_scale, denoiser.feature_dim, cfg=job.cfg_mode, methods=hooks,
                         grid=denoiser.grid(geometry), perturb=denoiser.perturbed_attention, layout=job.guidance_layout,
                         record=denoiser.record_self_attention if records_attention(denoiser) else None)
    device = denoiser.device  # the sampler state lives where the model's outputs do
    source = None if init is None else denoiser.from_latents(init.latents)[0].to(device, torch.float32)
    mask_at = (None if init is None or init.mask is None
               else mask_function(job, denoiser.from_latents(init.mask)[0].to(device), sigmas, floor))
    steps = space.sigmas(sigmas)
    # samplers call back after step i with x already at steps[i + 1]: that sigma converts it to the flow state
    callback = None if on_step is None else (
        lambda i, x, s: on_step(i, space.flow_state(x, float(steps[i + 1])), float(sigmas[i])))
    out = []
    with model_patches(denoiser, job):
        for seed in range(job.seed, job.seed + job.num_images):
            noise = denoiser.noise(geometry, seed).to(device)  # drawn on the CPU, as the reference draws it
            x, run_model = noise * sampling.flow_noise_scale(float(sigmas[0])), model
            if source is not None:  # diffusers' scale_noise: start on the source's path at the first sigma
                x = float(sigmas[0]) * noise + (1 - float(sigmas[0])) * source
                if mask_at is not None:  # the inpainting wrapper works on the flow path, around the guided model
                    run_model = space.model(masked_model(space.flow_model(model), source, noise, mask_at))
            x = SAMPLERS[job.sampler](run_model, space.state(x, float(sigmas[0])), steps, callback=callback,
                                      sampling=sampling, noising=space.noising,
                                      generator=torch.Generator().manual_seed(seed))  # ancestral / SDE / LCM noise
            x = space.flow_state(x, float(steps[-1]))
            out.append((job, seed, denoiser.to_latents(x, geometry).cpu()))
    return out
