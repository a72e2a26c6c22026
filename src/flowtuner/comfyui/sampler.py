"""The sampler and LoRA nodes: flowtuner's own sampling (sampling.py, what `flowtuner generate` runs: the reference
schedule, true CFG with norm rescale, every sampler, scheduler and --guidance method of the CLI, img2img and
inpainting) on flowtuner's DiT, with ComfyUI CONDITIONING in and a ComfyUI LATENT out.

Conventions (docs/comfyui.md "Sampler", "LoRA"):
- size and batch come from the LATENT input (EmptySD3LatentImage or any other); image i of the batch is drawn
  with seed + i, as `flowtuner generate --num_images` draws them (flowtuner's noise: diffusers' CPU draw);
- denoise < 1 (or a noise_mask in the LATENT) starts from the LATENT's image: `--strength denoise` (diffusers'
  truncation of the steps-long schedule, not ComfyUI's stretched one);
- the LATENT out is ComfyUI's format (raw VAE latents [B, 16, 1, h, w]), so VAEDecode takes it;
- a LoRA node does not touch the loaded model: it returns the DiT recipe with the LoRA added, which the loader
  loads as `flowtuner generate --lora_weight` does (loaders.FlowtunerModel).
"""

from __future__ import annotations


import torch

from flowtuner.comfyui.text import from_comfy_latent, normalised_references, to_comfy_latent
from flowtuner.config.sampling import CFG_MODES, sampling_fields
from flowtuner.errors import ConfigError
from flowtuner.families.base import Conditioning
from flowtuner.flow.samplers import SAMPLERS
from flowtuner.flow.schedulers import SCHEDULERS

MODEL_TYPE = "FLOWTUNER_MODEL"
LATENT_FACTOR = 8  # pixels per latent cell
#: sampling options with a widget of their own; the `options` line takes the others
WIDGETS = {"sampler": "sampler", "scheduler": "scheduler", "cfg_mode": "cfg_mode", "guidance": "guidance",
           "flow_shift": "flow_shift"}
#: where the source of an img2img / inpainting job is (sampling.py only asks whether there is one)
LATENT_SOURCE = "<the LATENT input>"


# ------------------------------------------------------------------ LoRAs
def _family(model):
    family = getattr(model, "family", None)
    if family is None:
        raise ConfigError("model: not a flowtuner model (connect the flowtuner DiT loader, not ComfyUI's MODEL).")
    return family


def add_lora(model, path: str, strength: float):
    """`model` (a FlowtunerModel recipe) with the LoRA at `path` added; the file is read now, so a bad one fails at
    this node in one line. The loaded model is never changed: the recipe with LoRAs loads as `flowtuner generate
    --lora_weight` loads it (merged; unmerged hooks with fp8 weights)."""
    from flowtuner.train.lora_formats import read_lora_file

    family = _family(model)
    weights, _ = family.lora_parts(read_lora_file(path, *family.lora_names()))  # Qwen-Image LoRAs: the DiT's only
    if strength == 0 or not weights:
        return model
    return model.with_loras([(path, strength)])


# ------------------------------------------------------------------ conditioning and latents
def conditioning(comfy_cond, which: str, edit: bool) -> Conditioning:
    """ComfyUI CONDITIONING (one entry) -> flowtuner's Conditioning, reference latents normalised."""
    from flowtuner.families.qwen_image.edit import REFERENCE_LATENTS

    if not comfy_cond:
        raise ConfigError(f"{which}: empty CONDITIONING.")
    if len(comfy_cond) > 1:
        raise ConfigError(f"{which}: {len(comfy_cond)} conditioning entries (combined or area conditioning); the "
                          "flowtuner Sampler takes one: connect one text encode.")
    embeds, extra = comfy_cond[0]
    refs = normalised_references(extra)
    if refs and not edit:
        raise ConfigError(f"{which} carries reference latents (an edit prompt) but the model is Qwen-Image (text to "
                          "image): load the DiT for its edit version, or encode without images.")
    return Conditioning(embeds, extra.get("attention_mask"), {REFERENCE_LATENTS: refs} if refs else {})


def _latents_5d(samples: torch.Tensor) -> torch.Tensor:
    if samples.dim() == 4:  # EmptySD3LatentImage / VAEEncode of 2-D models: ComfyUI unsqueezes the frame axis too
        samples = samples.unsqueeze(2)
    if samples.dim() != 5 or samples.shape[2] != 1:
        raise ConfigError(f"latent_image: shape {tuple(samples.shape)}; expected image latents [B, C, H, W] or "
                          "[B, C, 1, H, W].")
    return samples


def latent_mask(noise_mask: torch.Tensor, index: int, like: torch.Tensor, soft: bool) -> torch.Tensor:
    """ComfyUI's noise_mask (pixels, 1 = change) of batch item `index` on the latent grid, broadcast to `like`
    [1, C, 1, h, w]: nearest for a binary inpainting mask, bilinear for DifferentialDiffusion's soft one, as
    `flowtuner generate --mask` brings its mask file to the latents."""
    m = noise_mask.float().reshape(-1, 1, *noise_mask.shape[-2:])
    m = m[min(index, m.shape[0] - 1)].unsqueeze(0)
    size = like.shape[-2:]
    m = (torch.nn.functional.interpolate(m, size=size, mode="bilinear", align_corners=False) if soft
         else torch.nn.functional.interpolate(m, size=size))
    return m.reshape(1, 1, 1, *size).expand_as(like).contiguous()


# ------------------------------------------------------------------ options
def parse_options(text: str) -> dict:
    """The `options` widget: the remaining sampling flags of `flowtuner generate`, e.g.
    `--model_sampling aura_flow --shift 3.1` or `--shift_terminal 0`."""
    from flowtuner.config.prompt_lines import parse_prompt_line

    text = " ".join((text or "").split())
    if not text:
        return {}
    if not text.startswith("--"):
        raise ConfigError(f"options {text[:40]!r}: expected flags such as --model_sampling aura_flow --shift 3.1.")
    _, parsed = parse_prompt_line(" " + text, "flowtuner Sampler options: ")
    allowed = set(sampling_fields()) - set(WIDGETS)
    for name in parsed:
        if name in WIDGETS:
            raise ConfigError(f"flowtuner Sampler options: --{name} has its own widget ({WIDGETS[name]}); set it there.")
        if name not in allowed:
            raise ConfigError(f"flowtuner Sampler options: --{name} is not a sampling option here; valid: "
                              + ", ".join("--" + n for n in sorted(allowed)) + ".")
    return parsed


def guidance_lines(text: str) -> list[str] | None:
    """One `--guidance` value per line; blank lines and # comments skipped."""
    lines = [line.strip() for line in (text or "").splitlines()]
    lines = [line for line in lines if line and not line.startswith("#")]
    return lines or None


# ------------------------------------------------------------------ the sampler
def _progress(total: int):
    """ComfyUI's progress bar and its Cancel button, where ComfyUI is loaded; nothing otherwise (tests, scripts)."""
    try:
        import comfy.model_management
        import comfy.utils
    except ImportError:
        return None
    bar = comfy.utils.ProgressBar(total)

    def step(*_):
        comfy.model_management.throw_exception_if_processing_interrupted()
        bar.update(1)

    return step


def sample(model, positive, negative, latent_image: dict, seed: int = 0, steps: int = 25, cfg: float = 4.0,
           sampler: str = "euler", scheduler: str = "reference", cfg_mode: str = "norm_rescale", guidance: str = "",
           flow_shift: float = 0.0, denoise: float = 1.0, options: str = "") -> dict:
    """The node's work; returns the LATENT dict (ComfyUI's format)."""
    from flowtuner.guidance import runs_uncond
    from flowtuner.init_images import soft_mask
    from flowtuner.sampling import InitImage, Job, check_sampling, check_size, sample_job, step_count
    from flowtuner.conditioning import cond_keys

    family = _family(model)
    edit = getattr(family, "version", None) is not None
    samples = _latents_5d(latent_image["samples"])
    noise_mask = latent_image.get("noise_mask")
    batch, (h, w) = samples.shape[0], samples.shape[-2:]
    if not 0 < denoise <= 1:
        raise ConfigError(f"denoise {denoise}: must be in (0, 1] (1 = from noise, as text to image).")
    from_source = denoise < 1 or noise_mask is not None
    if from_source and samples.shape[1] != 16:
        raise ConfigError(f"latent_image has {samples.shape[1]} channels; denoise < 1 starts from it, and Qwen-Image "
                          "latents have 16: encode the image with the Qwen-Image VAE.")
    settings = dict(sampler=sampler, scheduler=scheduler, cfg_mode=cfg_mode, guidance=guidance_lines(guidance),
                    flow_shift=flow_shift or None, **parse_options(options))
    job = Job(prompt="positive", negative_prompt="negative" if runs_uncond(cfg) else None, height=h * LATENT_FACTOR,
              width=w * LATENT_FACTOR, steps=steps, guidance_scale=cfg, seed=seed, num_images=1,
              image=LATENT_SOURCE if from_source else None, strength=denoise if from_source else None,
              mask=LATENT_SOURCE if noise_mask is not None else None, **settings)
    check_size(job.height, job.width, family.size_step, "latent_image size")
    check_sampling(job)
    if runs_uncond(cfg) and negative is None:
        raise ConfigError(f"cfg {cfg} > 1 runs the unconditional pass: connect a negative conditioning (flowtuner "
                          "generate encodes ' ' when no negative prompt is given), or set cfg 1.")
    key, neg_key = cond_keys(job, family)
    conds = {key: conditioning(positive, "positive", edit)}
    if neg_key is not None:
        conds[neg_key] = conditioning(negative, "negative", edit)
    denoiser = model.denoiser()
    tokens = denoiser.geometry(job.height, job.width).image_tokens
    on_step = _progress(step_count(family, job, tokens) * batch)
    out = []
    for i in range(batch):
        item = Job(**{**_fields(job), "seed": seed + i})
        init = None
        if from_source:
            source = from_comfy_latent(samples[i : i + 1].float())
            mask = None if noise_mask is None else latent_mask(noise_mask, i, source, soft_mask(item))
            init = InitImage(source, mask)
        ((_, _, latents),) = sample_job(denoiser, family, item, conds, on_step, init)
        out.append(latents)
    result = dict(latent_image)
    result["samples"] = to_comfy_latent(torch.cat(out))
    return result


def _fields(job) -> dict:
    from dataclasses import fields

    return {f.name: getattr(job, f.name) for f in fields(job) if f.init}


class Sampler:
    """flowtuner Sampler."""

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": (MODEL_TYPE, {"tooltip": "flowtuner's DiT (flowtuner DiT Loader, optionally through flowtuner LoRA)"}),
                "positive": ("CONDITIONING",),
                "latent_image": ("LATENT", {"tooltip": "size and batch (e.g. EmptySD3LatentImage); with denoise < 1 "
                                                       "or a noise mask, the image to start from"}),
                "seed": ("INT", {"default": 0, "min": 0, "max": 0xFFFFFFFFFFFFFFFF, "control_after_generate": True,
                                 "tooltip": "image i of the batch uses seed + i (flowtuner generate --num_images)"}),
                "steps": ("INT", {"default": 25, "min": 1, "max": 10000}),
                "cfg": ("FLOAT", {"default": 4.0, "min": 0.0, "max": 100.0, "step": 0.1, "round": 0.01,
                                  "tooltip": "CFG scale (--guidance_scale); <= 1 skips the negative pass"}),
                "sampler": (tuple(SAMPLERS), {"default": "euler"}),
                "scheduler": (("reference", *SCHEDULERS), {"default": "reference",
                                                           "tooltip": "reference: Qwen-Image's diffusers schedule"}),
                "cfg_mode": (CFG_MODES, {"default": "norm_rescale", "tooltip": "norm_rescale: diffusers' true CFG; "
                                                                             "plain: ComfyUI's"}),
                "denoise": ("FLOAT", {"default": 1.0, "min": 0.01, "max": 1.0, "step": 0.01,
                                      "tooltip": "< 1: img2img from latent_image, --strength (diffusers' truncation)"}),
            },
            "optional": {
                "negative": ("CONDITIONING", {"tooltip": "needed when cfg > 1"}),
                "guidance": ("STRING", {"multiline": True, "default": "",
                                        "tooltip": "one --guidance value per line, e.g. cfg_norm:strength=1 or pag:scale=3"}),
                "flow_shift": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 100.0, "step": 0.01,
                                         "tooltip": "reference scheduler: a fixed shift (--flow_shift); 0 = the dynamic one"}),
                "options": ("STRING", {"default": "", "tooltip": "other sampling flags of flowtuner generate, e.g. "
                                                                  "--model_sampling aura_flow --shift 3.1"}),
            },
        }

    RETURN_TYPES = ("LATENT",)
    FUNCTION = "run"
    CATEGORY = "flowtuner"
    DESCRIPTION = "flowtuner's sampling (what `flowtuner generate` runs) on a flowtuner DiT; LATENT out for VAEDecode."

    def run(self, model, positive, latent_image, seed, steps, cfg, sampler, scheduler, cfg_mode, denoise,
            negative=None, guidance="", flow_shift=0.0, options=""):
        return (sample(model, positive, negative, latent_image, seed, steps, cfg, sampler, scheduler, cfg_mode,
                       guidance, flow_shift, denoise, options),)


class LoraLoader:
    """flowtuner LoRA: a flowtuner / musubi-tuner / diffusers / ComfyUI-format LoRA for flowtuner's DiT."""

    @classmethod
    def INPUT_TYPES(cls):
        import folder_paths

        return {
            "required": {
                "model": (MODEL_TYPE,),
                "lora_name": (folder_paths.get_filename_list("loras"),),
                "strength": ("FLOAT", {"default": 1.0, "min": -100.0, "max": 100.0, "step": 0.01,
                                       "tooltip": "--lora_multiplier"}),
            },
        }

    RETURN_TYPES = (MODEL_TYPE,)
    FUNCTION = "run"
    CATEGORY = "flowtuner"
    DESCRIPTION = "Lists a LoRA on the model; the flowtuner Sampler merges it for its run, as generate --lora_weight."

    def run(self, model, lora_name, strength):
        import folder_paths

        return (add_lora(model, folder_paths.get_full_path_or_raise("loras", lora_name), strength),)


NODES = {"flowtunerSampler": Sampler, "flowtunerLoraLoader": LoraLoader}
DISPLAY = {"flowtunerSampler": "flowtuner Sampler", "flowtunerLoraLoader": "flowtuner LoRA"}
