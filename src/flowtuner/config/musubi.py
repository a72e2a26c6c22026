"""musubi-tuner flags that flowtuner accepts without an option of its own, so that musubi-tuner command lines
and `--config_file` TOML files run unchanged.

Each entry is the flag's argparse spec as musubi-tuner declares it (values are type-checked the same way) and
what flowtuner does instead. Kinds:
- a note: logged once when the flag is given (it has no meaning here, or flowtuner does the thing anyway);
- `sets`: an alias of a flowtuner option value (`--flash_attn` = `--attn_mode flash`);
- `apply`: a process-wide torch setting flowtuner applies;
- `refuse`: a feature flowtuner does not have yet; a value that would matter is a one-line error.
Flags with a real flowtuner option (most of them) are dataclass fields in config/train.py, caching.py,
generate.py and models.py instead.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from flowtuner.config.fields import escape_help, flag_names
from flowtuner.errors import ConfigError

log = logging.getLogger("flowtuner.musubi")

FLAG = {"action": "store_true"}
INT, FLOAT, STR = {"type": int}, {"type": float}, {"type": str}
STRS = {"type": str, "nargs": "*"}


@dataclass(frozen=True)
class Flag:
    spec: dict[str, Any]
    note: str
    sets: tuple[str, Any] | None = None
    apply: Callable[[], None] | None = None
    refuse: bool = False


def _torch_flag(module: str, name: str, value: bool) -> Callable[[], None]:
    def apply() -> None:
        import importlib

        setattr(importlib.import_module(module), name, value)
    return apply


def _tf32() -> None:
    import torch

    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True


def _dynamo_backends() -> list[str]:
    from accelerate.utils import DynamoBackend

    return [e.value for e in DynamoBackend]


EAGER = "flowtuner runs the DiT eagerly (torch.compile is not wired in yet)"
ONLY_COMPILE = "only matters with --compile, which flowtuner does not use yet"
LAYERED_ONLY = "only for Qwen-Image-Layered, which is not available yet"
MEMORY_WORK = "not available yet (it comes with the memory work); run without it"
NO_UPLOAD = "flowtuner does not upload; the files stay in --output_dir"
NO_WANDB = "wandb is not available; --log_with tensorboard is"
READER = "flowtuner reads safetensors with its own reader (one copy in RAM); nothing to disable"
LAYERS = "flowtuner counts the blocks in the DiT file"
PINNED = "with --blocks_to_swap on CUDA the host copies are always pinned (transfers are asynchronous)"
H2D_ONLY = ("flowtuner's block swap is host-to-device only already (frozen weights are never copied back); "
            "--block_swap_ring_size sets its device buffers")
METADATA = "flowtuner writes its own modelspec.* metadata; this value is not used"

COMPILE: dict[str, Flag] = {
    "compile": Flag(FLAG, EAGER),
    "compile_backend": Flag(STR, ONLY_COMPILE),
    "compile_mode": Flag({"type": str, "choices": ["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"]},
                         ONLY_COMPILE),
    "compile_dynamic": Flag({"type": str, "choices": ["true", "false", "auto"]}, ONLY_COMPILE),
    "compile_fullgraph": Flag(FLAG, ONLY_COMPILE),
    "compile_cache_size_limit": Flag(INT, ONLY_COMPILE),
}

TRAIN: dict[str, Flag] = {
    # attention
    "flash_attn": Flag(FLAG, "same as --attn_mode flash", sets=("attn_mode", "flash")),
    "sage_attn": Flag(FLAG, "same as --attn_mode sage", sets=("attn_mode", "sage")),
    "xformers": Flag(FLAG, "same as --attn_mode xformers", sets=("attn_mode", "xformers")),
    "flash3": Flag(FLAG, "FlashAttention 3 is not used for Qwen-Image (nor by musubi-tuner); --attn_mode picks the backend"),
    # compile, CUDA, dynamo
    **COMPILE,
    "cuda_allow_tf32": Flag(FLAG, "enables TF32 matmuls and convolutions", apply=_tf32),
    "cuda_cudnn_benchmark": Flag(FLAG, "enables cuDNN benchmark mode", apply=_torch_flag("torch.backends.cudnn", "benchmark", True)),
    "dynamo_backend": Flag({"type": str, "choices": "dynamo"}, "accelerate's dynamo is not used; " + EAGER),
    "dynamo_mode": Flag({"type": str, "choices": ["default", "reduce-overhead", "max-autotune"]}, "accelerate's dynamo is not used"),
    "dynamo_fullgraph": Flag(FLAG, "accelerate's dynamo is not used"),
    "dynamo_dynamic": Flag(FLAG, "accelerate's dynamo is not used"),
    # data and memory
    "persistent_data_loader_workers": Flag(FLAG, "flowtuner's loader threads persist anyway"),
    "use_pinned_memory_for_block_swap": Flag(FLAG, PINNED),
    "block_swap_h2d_only": Flag(FLAG, H2D_ONLY),
    "img_in_txt_in_offloading": Flag(FLAG, "no effect for Qwen-Image (as in musubi-tuner)"),
    "disable_numpy_memmap": Flag(FLAG, READER),
    "num_layers": Flag(INT, LAYERS),
    "vae_dtype": Flag(STR, "the VAE runs in its weights' dtype (musubi-tuner ignores the flag for Qwen-Image too)"),
    "remove_first_image_from_target": Flag(FLAG, LAYERED_ONLY),
    # logging, DDP
    "log_prefix": Flag(STR, "the tensorboard folder is --logging_dir (default OUTPUT_DIR/logs), without a prefix"),
    "log_tracker_name": Flag(STR, "the tensorboard folder is --logging_dir (default OUTPUT_DIR/logs); runs have no tracker name"),
    "wandb_run_name": Flag(STR, NO_WANDB),
    "wandb_api_key": Flag(STR, NO_WANDB),
    "log_tracker_config": Flag(STR, "no tracker config is read"),
    "log_config": Flag(FLAG, "the configuration is not logged; the saved LoRA's ss_* metadata record the main options"),
    "ddp_timeout": Flag(INT, "multi-process runs use accelerate's DDP defaults"),
    "ddp_gradient_as_bucket_view": Flag(FLAG, "multi-process runs use accelerate's DDP defaults"),
    "ddp_static_graph": Flag(FLAG, "multi-process runs use accelerate's DDP defaults"),
    # objective
    "guidance_scale": Flag(FLOAT, "embedded guidance is HunyuanVideo's; Qwen-Image has none (musubi-tuner ignores it too)"),
    "num_timestep_buckets": Flag(INT, "timesteps are drawn independently per sample (the same distribution, without "
                                      "per-epoch stratification)"),
    # network
    "dim_from_weights": Flag(FLAG, "with --network_weights flowtuner always takes each module's rank and alpha from the file"),
    "training_comment": Flag(STR, "no training comment is written into the metadata"),
    "scale_weight_norms": Flag(FLOAT, "max-norm scaling of LoRA weights is not available; run without it", refuse=True),
    "base_weights": Flag(STRS, "merging LoRAs into the DiT before training is not available; merge them with "
                               "`flowtuner generate --lora_weight ... --save_merged_model DIT` and train on that DiT", refuse=True),
    "base_weights_multiplier": Flag({"type": float, "nargs": "*"}, "only matters with --base_weights"),
    # saving
    "save_last_n_epochs_state": Flag(INT, "state folders are pruned together with the weights (--save_last_n_epochs)"),
    "save_last_n_steps_state": Flag(INT, "state folders are pruned together with the weights (--save_last_n_steps)"),
    **{f"metadata_{k}": Flag(STR, METADATA) for k in ("title", "author", "description", "license", "tags", "reso", "arch")},
    "huggingface_repo_id": Flag(STR, NO_UPLOAD),
    "huggingface_repo_type": Flag(STR, NO_UPLOAD),
    "huggingface_path_in_repo": Flag(STR, NO_UPLOAD),
    "huggingface_token": Flag(STR, NO_UPLOAD),
    "huggingface_repo_visibility": Flag(STR, NO_UPLOAD),
    "save_state_to_huggingface": Flag(FLAG, NO_UPLOAD),
    "async_upload": Flag(FLAG, NO_UPLOAD),
    "resume_from_huggingface": Flag(FLAG, "resuming from the Hugging Face Hub is not available; download the state "
                                          "folder and pass it to --resume", refuse=True),
}

CACHE_LATENTS: dict[str, Flag] = {
    "vae_dtype": Flag(STR, "the VAE runs in its weights' dtype (musubi-tuner refuses the flag for Qwen-Image)"),
    "debug_mode": Flag({"type": str, "choices": ["image", "console", "video"]},
                       "use `flowtuner dataset check --dataset_config FILE --preview DIR` to see the buckets and crops",
                       refuse=True),
    "console_width": Flag(INT, "only matters with --debug_mode"),
    "console_back": Flag(STR, "only matters with --debug_mode"),
    "console_num_images": Flag(INT, "only matters with --debug_mode"),
    "disable_cudnn_backend": Flag(FLAG, "disables cuDNN", apply=_torch_flag("torch.backends.cudnn", "enabled", False)),
    "vae_tiling": Flag(FLAG, "HunyuanVideo's VAE option; no effect for Qwen-Image (as in musubi-tuner)"),
    "vae_chunk_size": Flag(INT, "HunyuanVideo's VAE option; no effect for Qwen-Image (as in musubi-tuner)"),
    "vae_spatial_tile_sample_min_size": Flag(INT, "HunyuanVideo's VAE option; no effect for Qwen-Image (as in musubi-tuner)"),
}

CACHE_TEXT: dict[str, Flag] = {}

GENERATE: dict[str, Flag] = {
    "num_layers": Flag(INT, LAYERS),
    "disable_numpy_memmap": Flag(FLAG, READER),
    "vae_enable_tiling": Flag(FLAG, "the VAE decodes the whole image at once (tiling is not available yet)"),
    "include_patterns": Flag(STRS, "filtering LoRA modules at load is not available; merge the whole LoRA", refuse=True),
    "exclude_patterns": Flag(STRS, "filtering LoRA modules at load is not available; merge the whole LoRA", refuse=True),
    "automatic_prompt_lang_for_layered": Flag({"type": str, "choices": ["en", "cn"]}, LAYERED_ONLY),
    "output_layers": Flag(INT, LAYERED_ONLY),
    "append_original_name": Flag(FLAG, "output names are flowtuner's own (time stamp and seed)"),
    "embedded_cfg_scale": Flag(FLOAT, "unused by Qwen-Image (musubi-tuner only writes it into the metadata)"),
    "use_pinned_memory_for_block_swap": Flag(FLAG, PINNED),
    "no_metadata": Flag(FLAG, "flowtuner always embeds the generation parameters in its outputs"),
    "latent_path": Flag(STRS, "decoding saved latents is not available yet", refuse=True),
    "lycoris": Flag(FLAG, "flowtuner merges LoRA files itself (kohya, diffusers and ComfyUI layouts); LoHa / LoKr "
                          "files are refused with a message"),
    **COMPILE,
    **{name: Flag(spec, "the reference consistency mask is not available yet")
       for name, spec in (("rcm_threshold", FLOAT), ("rcm_relative_threshold", FLAG), ("rcm_kernel_size", INT),
                          ("rcm_dilate_size", INT), ("rcm_debug_save", FLAG))},
    "interactive": Flag(FLAG, "interactive mode is not available; use --prompt or --from_file", refuse=True),
    "bell": Flag(FLAG, "no bell is rung"),
}


def _spec(flag: Flag) -> dict:
    """The argparse keywords; "dynamo" stands for accelerate's DynamoBackend values, read when a parser is built
    rather than when this module is imported."""
    spec = dict(flag.spec)
    if spec.get("choices") == "dynamo":
        spec["choices"] = _dynamo_backends()
    return spec


def add_musubi_flags(parser: argparse.ArgumentParser, table: dict[str, Flag]) -> None:
    """The table's flags in their own help group; unset flags stay out of the namespace (SUPPRESS)."""
    if not table:
        return
    group = parser.add_argument_group("musubi-tuner flags with no flowtuner option (each logs what flowtuner does)")
    for name, flag in table.items():
        group.add_argument(*flag_names(name), dest=name, default=argparse.SUPPRESS, help=escape_help(flag.note),
                           **_spec(flag))


def _matters(value: Any) -> bool:
    return value not in (None, False, 0, [], "")


def apply_musubi_flags(args: argparse.Namespace, table: dict[str, Flag]) -> list[str]:
    """Act on the table's flags present in `args` (command line or config file); returns the lines logged."""
    lines = []
    for name, flag in table.items():
        if not hasattr(args, name):
            continue
        value = getattr(args, name)
        if flag.sets is not None:
            if value:
                setattr(args, *flag.sets)
            continue
        if flag.refuse and _matters(value):
            raise ConfigError(f"--{name}: {flag.note}.")
        if flag.apply is not None and value:
            flag.apply()
        lines.append(f"--{name} (musubi-tuner): {flag.note}")
        log.info(lines[-1])
    return lines
