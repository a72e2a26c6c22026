"""What a model family offers the shared code (generation now; caching and training later).

A family is a thin adapter: it loads its components and exposes
  - a text encoder:  encode(prompts) -> one Conditioning per prompt,
  - a denoiser:      noise(...), predict(x, sigma, cond) -> velocity, in the family's own latent layout,
  - a VAE:           decode(latents) -> images in [0, 1].
Shared code (flow/, guidance/, the generate runner) sees only these, never a model name.

Flow convention everywhere: x_t = (1 - sigma) x0 + sigma eps, sigma = 1 is pure noise, the model
predicts v = eps - x0, x0 = x_t - sigma v. A family converts sigma to its model's timestep input in
exactly one place (its denoiser's `predict`).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from flowtuner.errors import ConfigError
from flowtuner.flow.schedules import ShiftLine


@dataclass
class ModelPaths:
    """Resolved component locations (files or folders). None = not given / not found."""

    dit: Path | None = None
    vae: Path | None = None
    text_encoder: Path | None = None
    tokenizer: Path | None = None
    comfyui_dir: Path | None = None
    model_root: Path | None = None


@dataclass
class Conditioning:
    """Text conditioning for one or more prompts: embeds [B, L, D], mask [B, L] (None = all valid).
    `extra` holds family-specific inputs (reference latents for edit models, pooled vectors for SDXL)."""

    embeds: torch.Tensor
    mask: torch.Tensor | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def to(self, device: torch.device | str) -> Conditioning:
        """The same conditioning on `device`: every tensor, also inside `extra` (lists and dicts of tensors)."""
        return Conditioning(_to(self.embeds, device), _to(self.mask, device), _to(self.extra, device))


def _to(value, device):
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, dict):
        return {k: _to(v, device) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_to(v, device) for v in value)
    return value


@dataclass(frozen=True)
class LatentGeometry:
    """Where the latents of one image of `height` x `width` pixels live."""

    height: int
    width: int
    state_shape: tuple[int, ...]  # the sampler's tensor for one image (family layout)
    image_tokens: int  # sequence length the model sees (drives dynamic shift)


@dataclass
class PromptVariants:
    """An item's training prompts and how to encode them (Family.prompt_variants)."""

    prompts: list[str]
    encode_options: dict[str, Any] = field(default_factory=dict)


class TextEncoder(ABC):
    @abstractmethod
    def encode(self, prompts: list[str], images: list[list[Any]] | None = None, sizes: list[list] | None = None) -> list[Conditioning]:
        """One Conditioning per prompt; `images`: per prompt, its control images (PIL) for families that read them
        with the text (edit models), None otherwise; `sizes`: the family's image sizes for them (None: its default)."""


class Denoiser(ABC):
    #: axis of the sampler state along which a per-location feature vector lies (CFG norm rescale)
    feature_dim: int = -1
    #: the torch module LoRAs attach to / merge into
    module: torch.nn.Module

    @property
    def device(self) -> torch.device:
        return next(self.module.parameters()).device

    @abstractmethod
    def geometry(self, height: int, width: int) -> LatentGeometry: ...

    @abstractmethod
    def noise(self, geometry: LatentGeometry, seed: int) -> torch.Tensor: ...

    @abstractmethod
    def predict(self, x: torch.Tensor, sigma: torch.Tensor, cond: Conditioning, geometry: LatentGeometry) -> torch.Tensor: ...

    @abstractmethod
    def to_latents(self, x: torch.Tensor, geometry: LatentGeometry) -> torch.Tensor:
        """Sampler state -> the VAE's latent layout (normalised)."""

    @abstractmethod
    def grid(self, geometry: LatentGeometry) -> tuple:
        """(to_grid, from_grid): sampler state <-> the image grid [B, C, H, W] guidance methods work on."""

    @abstractmethod
    def from_latents(self, latents: torch.Tensor) -> tuple[torch.Tensor, LatentGeometry]:
        """Cached latents (the VAE's layout) -> (sampler state, geometry): the training input."""

    def swap_blocks(self) -> torch.nn.ModuleList:
        """The ModuleList whose blocks --blocks_to_swap streams (weights/block_swap.py)."""
        raise ConfigError(f"--blocks_to_swap: {type(self).__name__} has no block list to swap; run without it.")

    def perturbed_attention(self, blocks: str) -> AbstractContextManager:
        """A context in which `predict` runs with identity self-attention in `blocks` (PAG)."""
        raise ConfigError(f"--guidance pag: {type(self).__name__} has no perturbed-attention pass.")

    def record_self_attention(self) -> AbstractContextManager:
        """A context yielding a list into which `predict` puts the self-attention probabilities it records (SAG)."""
        raise ConfigError(f"--guidance sag: reads a UNet's middle-block self-attention; {type(self).__name__} has no "
                          "UNet. Drop it for this model (pag gives structure guidance on any family).")

    def model_patch(self, name: str, params: dict) -> AbstractContextManager:
        """A context in which `predict` runs with the model patch `name` (a `--guidance` method of stage "model")."""
        raise ConfigError(f"--guidance {name}: a UNet patch (it rescales UNet output-block features); "
                          f"{type(self).__name__} has no UNet. Drop it for this model.")


class ImageCodec(ABC):
    @abstractmethod
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Normalised latents -> images [B, 3, H, W] in [0, 1], float32 on the CPU."""

    @abstractmethod
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Images [B, 3, H, W] in [0, 1] -> normalised latents (the family's cache layout)."""


class Family(ABC):
    name: str
    #: pixel multiple that image sizes must respect (and the bucket step)
    size_step: int
    #: pixels per latent cell
    latent_scale: int
    #: short name in cache file names (musubi-tuner: qi, qie, ...) and the full one in their metadata
    cache_arch: str
    architecture: str

    #: LoRA-able Linear paths inside one block, and outside the blocks (tables for LoRA key names)
    lora_block_modules: tuple[str, ...]
    lora_stem_modules: tuple[str, ...]
    #: the ModuleList holding the blocks: kohya names flatten `<lora_blocks>.<i>.<block module>`
    lora_blocks: str
    #: musubi-tuner's --network_module for this family: accepted, and written as ss_network_module
    network_module: str
    #: the resolution-dependent shift of its schedule (dynamic shift, and training's model-shift samplers)
    shift_line: ShiftLine
    #: --timestep_sampling when the flag is not given
    default_timestep_sampling: str
    #: the modelspec block of trained files
    modelspec_architecture: str
    modelspec_implementation: str
    modelspec_resolution: str

    @property
    def base_model_version(self) -> str:
        """ss_base_model_version of trained LoRAs (musubi-tuner's architecture_full_name): the cache
        metadata's architecture unless a family's trained files name another (Qwen-Image-Edit)."""
        return self.architecture

    #: control images one item / prompt may have (edit models); 0: the family takes none
    max_controls: int = 0
    #: what its models can predict (--prediction_type: flow, eps, v; train/objective.py), the first being what a
    #: plain checkpoint predicts (generation's default), and what training trains when the flag is absent
    prediction_types: tuple[str, ...] = ("flow",)
    train_prediction_type: str = "flow"
    #: the prediction type this command runs (set by families.family_for from --prediction_type or the defaults)
    prediction_type: str = "flow"
    #: tensors every text cache of this family holds (names without musubi-tuner's dtype suffix)
    text_cache_names: tuple[str, ...]
    #: text-cache tensors whose shapes a batch must share (data/loader.py groups batches by them too): e.g. SDXL's
    #: prompt embeddings, 77 x chunks long with no mask; () = batches group by dataset and bucket only
    batch_group_tensors: tuple[str, ...] = ()

    @abstractmethod
    def text_cache_tensors(self, cond: Conditioning) -> dict[str, torch.Tensor]:
        """One prompt's Conditioning (batch 1) -> the tensors its text cache stores, by name without the dtype
        suffix (the cache writer appends `_<dtype>`, musubi-tuner's convention)."""

    @abstractmethod
    def cached_conditioning(self, text: list[dict[str, torch.Tensor]], latent_extras: list[dict[str, torch.Tensor]]) -> Conditioning:
        """A batch's cached tensors -> the Conditioning `predict` takes: per item, its text cache's tensors and
        the tensors of its latent cache other than the latents themselves (e.g. an edit model's reference
        latents), both by name without the dtype suffix. Runs in the data loader (CPU)."""

    #: identifies the prompt recipe of `prompt_variants` (part of a variant text cache's provenance); "" = none
    prompt_recipe: str = ""

    def prompt_variants(self, item, count: int, seed: int, encoder: TextEncoder) -> PromptVariants:
        """`count` training prompts of a dataset item (data.sources.Item) for cache-text, variant k a pure function
        of (seed, k, item), with the keywords `encoder.encode` takes for them (e.g. the item's chunk count). A family
        without a prompt recipe has the caption as its only variant."""
        if count != 1:
            raise ConfigError(f"prompt_variants = {count}: the {self.name} model has no prompt recipe to draw variants "
                              "with; set prompt_variants = 1 (the caption as is).")
        return PromptVariants([item.caption])

    def check_controls(self, count: int) -> None:
        """A one-line error when a prompt's number of control images does not suit the model."""
        if count:
            raise ConfigError("control images (--control_image_path / --ci) are for the edit models (--model_version "
                              "edit, edit-2509, edit-2511); this model reads text only.")

    def configure(self, cfg) -> None:
        """Take the command's model-specific options (e.g. how control images are sized); called by family_for."""

    def control_key(self, job) -> tuple:
        """What, besides the text and the control image files, a job's conditioning depends on (e.g. its output
        size, when control images are resized to it); part of the conditioning's key."""
        return ()

    def control_sizes(self, images: list, key: tuple) -> tuple[list | None, list | None]:
        """(sizes for the text encoder, sizes for the latents) of the control images under `key`; None: default."""
        return None, None

    def control_conditioning(self, cond: Conditioning, images: list, codec: ImageCodec, key: tuple = ()) -> Conditioning:
        """`cond` (encoded with `images`) carrying what the denoiser needs of the control images themselves
        (an edit model's reference latents), made with `codec`."""
        raise ConfigError("this model takes no control images; drop --control_image_path / --ci.")

    def default_image_size(self, control_sizes: list[tuple[int, int]]) -> tuple[int, int] | None:
        """(height, width) of the output when no size is given, from the control images' (width, height); None:
        the command's own default."""
        return None

    def lora_names(self) -> tuple[list[str], list[str], str]:
        """(block modules, stem modules, blocks path): the tables a LoRA file's keys are read with."""
        return list(self.lora_block_modules), list(self.lora_stem_modules), self.lora_blocks

    @abstractmethod
    def lora_default_targets(self, module: torch.nn.Module) -> list[str]:
        """Module paths a LoRA trains when no include/exclude pattern is given."""

    #: whether its LoRA files may hold text-encoder modules, merged by `merge_text_lora` (SDXL's lora_te1_ / lora_te2_)
    text_loras: bool = False

    def full_state(self, module: torch.nn.Module, cfg, state: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """What `flowtuner finetune` saves of the trained denoiser `module` (cfg: the run's config): its state dict
        by default; a family whose users load whole checkpoints returns that file's tensors. `state`: the module's
        state dict when it was gathered elsewhere (FSDP: the module itself holds only this process's shards)."""
        return module.state_dict() if state is None else state

    def fsdp_units(self, module: torch.nn.Module) -> list[torch.nn.Module]:
        """The submodules of the denoiser `module` that FSDP2 shards as one unit each (their weights are gathered
        together, just before they run); the rest stays in the root unit. Default: each block of `lora_blocks`."""
        try:
            return list(module.get_submodule(self.lora_blocks))
        except AttributeError:
            raise ConfigError(f"--fsdp: {self.name} names no block list to shard; run without --fsdp.") from None

    def lora_parts(self, weights: dict) -> tuple[dict, dict]:
        """(the denoiser's modules, the text encoder's modules) of a LoRA file's {module path: LoRAWeights}."""
        return weights, {}

    def merge_text_lora(self, encoder: TextEncoder, weights: dict, multiplier: float, source: str) -> None:
        """Merge a LoRA's text-encoder modules (the second part of `lora_parts`) into `encoder`'s weights."""
        raise ConfigError(f"{source}: it has text-encoder LoRA modules; {self.name} LoRAs apply to the denoiser only.")

    @abstractmethod
    def cache_size_estimate(self, bucket: tuple[int, int], caption: str) -> tuple[int, int]:
        """(latent cache bytes, text cache bytes) for one item, before any model is loaded."""

    @abstractmethod
    def text_recipe(self) -> str:
        """Identifies how captions become embeddings (template, cut, limits): part of a text cache's provenance."""

    @abstractmethod
    def resolve_paths(self, **given: Any) -> ModelPaths: ...

    @abstractmethod
    def validate(self, paths: ModelPaths, slots: tuple[str, ...]) -> None:
        """Check every file's header for its slot before anything heavy is loaded (fail fast)."""

    @abstractmethod
    def load_text_encoder(self, paths: ModelPaths, device: torch.device) -> TextEncoder: ...

    @abstractmethod
    def load_denoiser(self, paths: ModelPaths, device: torch.device, attn_mode: str = "torch") -> Denoiser: ...

    @abstractmethod
    def load_codec(self, paths: ModelPaths, device: torch.device) -> ImageCodec: ...

    def split_attention(self, module: torch.nn.Module) -> None:
        """--split_attn: make the denoiser's attention run per sample over its own unpadded length."""
        raise ConfigError(f"--split_attn: {self.name} has no per-sample attention; run without it.")

    def plan_spec(self, paths: ModelPaths | None):
        """What `flowtuner plan` builds and traces (flowtuner.plan.PlanSpec): from the files' headers in `paths`,
        or the published sizes when `paths` is None or has no DiT."""
        raise ConfigError(f"flowtuner plan: planning {self.name} is not available yet.")

    @abstractmethod
    def comfy_model_sampling(self):
        """The sigma table ComfyUI gives this model by default (for its schedulers)."""

    @abstractmethod
    def default_sigmas(self, steps: int, image_tokens: int, **overrides: float) -> torch.Tensor:
        """The family's reference schedule (steps + 1 values, ending in 0). `overrides`: flow_shift,
        base_shift, max_shift, shift_terminal (the `--` flags of the same names)."""
