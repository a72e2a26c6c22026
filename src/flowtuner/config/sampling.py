"""How to sample: sampler, sigma schedule, model-sampling (shift) mode, CFG function and guidance methods.

Shared by `flowtuner generate` (flags), its `--from_file` prompt lines and training `--sample_prompts`
(inline `--name value` options, every field below), and `flowtuner sigmas`. Presets are named bundles
of these values; explicit flags win over them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

from flowtuner.config.fields import opt
from flowtuner.flow.samplers import SAMPLERS
from flowtuner.flow.schedulers import SCHEDULERS
from flowtuner.guidance.methods import LAYOUTS, METHODS

MODEL_SAMPLINGS = ("default", "aura_flow", "sd3", "flux")
CFG_MODES = ("norm_rescale", "plain")


@dataclass(kw_only=True)
class ScheduleConfig:
    scheduler: str = opt("reference", "sigma schedule: reference (Qwen-Image's diffusers schedule) or a ComfyUI scheduler",
                         choices=("reference", *SCHEDULERS))
    flow_shift: float | None = opt(help="reference: a fixed SD3-style shift s t / (1 + (s - 1) t) instead of the dynamic one")
    base_shift: float | None = opt(help="dynamic shift mu at 256 image tokens (reference: 0.5; --model_sampling flux: 0.5)")
    max_shift: float | None = opt(help="dynamic shift mu at the top size (reference: 0.9 at 8192 tokens; --model_sampling flux: 1.15 at 4096)")
    shift_terminal: float | None = opt(help="reference: stretch the schedule so its last sigma is this (default 0.02; 0 = no stretch)")
    model_sampling: str = opt("default", "ComfyUI schedulers' sigma table: default (the model's own: Qwen-Image = Flux table, mu 1.15), "
                                         "aura_flow / sd3 (fixed --shift; identical sigmas here), flux (mu from the image size "
                                         "and --base_shift/--max_shift, or --mu)", choices=MODEL_SAMPLINGS)
    shift: float | None = opt(help="ComfyUI schedulers: AuraFlow/SD3 shift of the sigma table (default 1.73 for aura_flow, 3.0 for sd3); "
                                   "implies --model_sampling aura_flow")
    mu: float | None = opt(help="ComfyUI schedulers: Flux-table exponent (shift = e^mu); implies --model_sampling flux")


@dataclass(kw_only=True)
class SamplingConfig(ScheduleConfig):
    sampler: str = opt("euler", "sampler", choices=tuple(SAMPLERS))
    cfg_mode: str = opt("norm_rescale", "CFG function: norm_rescale (diffusers' true CFG, rescaled to the conditional norm) "
                                        "or plain (uncond + w (cond - uncond), as ComfyUI)", choices=CFG_MODES)
    guidance: list[str] | None = opt(help="guidance method NAME[:key=value,...], repeatable, applied in order (pre-CFG, CFG, post-CFG): "
                                          + ", ".join(METHODS), repeatable=True)
    guidance_layout: str = opt("grid", "how --guidance methods see the latents: grid (the 2-D image grid [B, C, H, W] they are "
                                       "written for) or comfyui (ComfyUI's 5-D [B, C, 1, H, W] Qwen-Image latents, to reproduce a "
                                       "ComfyUI image: FreSca becomes a plain scale, APG's norms run per channel, RescaleCFG's "
                                       "std per width column)", choices=tuple(LAYOUTS))


def sampling_fields() -> list[str]:
    return [f.name for f in fields(SamplingConfig)]


PRESETS: dict[str, dict] = {
    # Lightning LoRAs (lightx2v Qwen-Image-Lightning) are distilled for CFG 1 and the scheduler their
    # authors ship: exponential shift with base_shift = max_shift = ln 3 (mu constant) and no terminal stretch.
    "lightning": {"guidance_scale": 1.0, "infer_steps": 8, "scheduler": "reference", "base_shift": math.log(3),
                  "max_shift": math.log(3), "shift_terminal": 0.0},
    # ComfyUI's Qwen-Image graphs: ModelSamplingAuraFlow 3.1, KSampler euler / simple, plain CFG.
    "comfy-qwen": {"scheduler": "simple", "sampler": "euler", "model_sampling": "aura_flow", "shift": 3.1, "cfg_mode": "plain"},
    # ComfyUI's official Qwen-Image-Edit template (image_qwen_image_edit.json): ModelSamplingAuraFlow 3 + CFGNorm 1,
    # KSampler 20 steps, cfg 2.5, euler / simple.
    "comfy-qwen-edit": {"infer_steps": 20, "guidance_scale": 2.5, "scheduler": "simple", "sampler": "euler",
                        "model_sampling": "aura_flow", "shift": 3.0, "cfg_mode": "plain", "guidance": ["cfg_norm:strength=1"]},
    # bigASP v2.5's model card (a flow-matching SDXL): ModelSamplingSD3 shift 6 ("best overall"), euler / normal,
    # CFG 5 (its 4-6 range), negative "low quality"; the model is SDXL and predicts flow whatever its file says.
    "bigasp": {"model_version": "sdxl", "prediction_type": "flow", "sampler": "euler", "scheduler": "normal",
               "model_sampling": "sd3", "shift": 6.0, "guidance_scale": 5.0, "cfg_mode": "plain",
               "negative_prompt": "low quality"},
}


def _first_line(fn) -> str:
    return (fn.__doc__ or "").strip().splitlines()[0]


def describe_sampling() -> str:
    """The `generate --help` epilog: every sampler, scheduler and guidance method, one line each."""
    lines = ["samplers (--sampler; d = (x - D)/sigma, the velocity on flow models; D the denoised estimate):"]
    lines += [f"  {name:24} {_first_line(fn)}" for name, fn in SAMPLERS.items()]
    lines += ["", "schedulers (--scheduler; S = the model sampling's sigma table of length L, N steps):",
              "  reference                linspace(1, 1/N, N), exponential shift mu(image tokens), stretched to end at 0.02 (diffusers)"]
    lines += [f"  {name:24} {_first_line(fn)}" for name, fn in SCHEDULERS.items()]
    lines += ["", "guidance (--guidance NAME:key=value,...; pre-CFG, CFG, post-CFG in ComfyUI's order, on D; D_c / D_u cond /"
                  " uncond, w the CFG scale):"]
    for name, m in METHODS.items():
        defaults = ", ".join(f"{k}={v}" for k, v in m.defaults.items()) or "no options"
        lines.append(f"  {name:24} [{m.stage}] {m.help} ({defaults})")
    lines += ["", "presets (--preset):"]
    lines += [f"  {name:24} " + ", ".join(f"{k}={v:.6g}" if isinstance(v, float) else f"{k}={v}" for k, v in p.items())
              for name, p in PRESETS.items()]
    return "\n".join(lines) + "\n"
