"""The model-file options every model-loading command shares."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from flowtuner.config.fields import opt
from flowtuner.errors import ConfigError

log = logging.getLogger(__name__)


@dataclass
class ModelFiles:
    dit: str | None = opt(help="DiT weights: .safetensors file (bare or model.diffusion_model. keys, bf16 / fp8 / fp8_scaled) or diffusers transformer/ folder")
    vae: str | None = opt(help="VAE weights: diffusers or original Wan-2.1 layout, file or folder")
    text_encoder: str | None = opt(help="Qwen2.5-VL weights: ComfyUI qwen_2.5_vl_7b.safetensors or a Hugging Face folder")
    tokenizer: str | None = opt(help="tokenizer folder (vocab.json + merges.txt); by default searched near the model files, the HF cache and the ComfyUI install")
    model: str | None = opt(help="Hugging Face repo root with transformer/, vae/, text_encoder/, tokenizer/; fills every slot not given")
    comfyui_dir: str | None = opt(help="ComfyUI install: bare file names resolve in models/diffusion_models, models/text_encoders, models/vae (default: $COMFYUI_PATH)")


@dataclass
class ModelVersion:
    """musubi-tuner's model-version switch, on every model command."""

    model_version: str | None = opt(help="model to run, by musubi-tuner's names: original (Qwen-Image, also right for "
                                         "Qwen-Image-2512), edit, edit-2509, edit-2511 (Qwen-Image-Edit), layered "
                                         "(case-insensitive; default: what a diffusers folder's model_index.json / "
                                         "transformer config says, else original)", type=str.lower)
    edit: bool = opt(False, "musubi-tuner's legacy switch for --model_version edit (used when --model_version is absent)")
    edit_plus: bool = opt(False, "musubi-tuner's legacy switch for --model_version edit-2509 (wins over --edit)")


@dataclass
class ModelPrediction:
    """What the model predicts / is trained to predict (families.family_for checks it against the family)."""

    prediction_type: str | None = opt(help="flow (v = eps - x0, the UNet fed 1000 sigma), eps or v (the DDPM table): "
                                           "train: the objective (default: the family's; SDXL: flow, converting an eps "
                                           "checkpoint); generate: what the checkpoint predicts (default: SDXL eps; Qwen: "
                                           "flow) (docs/sdxl.md)", choices=("flow", "eps", "v"), type=str.lower)
    v_parameterization: bool = opt(False, "sd-scripts' switch: same as --prediction_type v")
    zero_terminal_snr: bool = opt(False, "eps / v: the DDPM table rescaled to zero terminal SNR (sd-scripts' flag; "
                                         "ComfyUI's ModelSamplingDiscrete zsnr)")


def resolve_model_version(cfg) -> str:
    """musubi-tuner's rule (--model_version, else --edit_plus, else --edit), else what the model files say
    (families.detect_version), else the default; stored back in cfg.model_version. A version the files
    contradict, an unknown one, or one flowtuner cannot run yet is a one-line error; a DiT file name that
    suggests another member than the flag is a warning (as in musubi-tuner). Idempotent."""
    from flowtuner.families import DEFAULT_VERSION, VERSIONS, detect_version, name_hints

    if getattr(cfg, "_resolved_version", None) is not None and cfg._resolved_version == cfg.model_version:
        return cfg.model_version  # checked (and warned about) once per command
    dit, model = getattr(cfg, "dit", None), getattr(cfg, "model", None)
    if cfg.model_version is not None:
        version, source = cfg.model_version.lower(), f"--model_version {cfg.model_version}"
    elif cfg.edit_plus:
        version, source = "edit-2509", "--edit_plus"
    elif cfg.edit:
        version, source = "edit", "--edit"
    else:
        version, source = None, ""
    if version is not None and version not in VERSIONS:
        raise ConfigError(f"{source}: unknown model version; choose one of {', '.join(VERSIONS)}.")
    detected, evidence = detect_version(dit, model)
    if detected is not None and version is not None and detected != version:
        raise ConfigError(f"{source} contradicts the model files ({evidence}: {VERSIONS[detected].model}); "
                          f"drop the flag or pass --model_version {detected}.")
    if version is None:
        version = detected or DEFAULT_VERSION
        source = f"{evidence}" if detected else ""
    for hint in name_hints(dit) - {version}:
        if not version.startswith(hint):
            log.warning("the DiT file name %s suggests %s, but %s runs as %s; pass --model_version if that is wrong.",
                        Path(dit).name, VERSIONS[hint].model, "it" if not source else source, VERSIONS[version].model)
    entry = VERSIONS[version]
    cfg.model_version = version
    if entry.family is None:
        why = f" ({entry.missing})" if entry.missing else ""
        raise ConfigError(f"{source or '--model_version ' + version}: {entry.model} is not available yet{why}; run "
                          "without it for Qwen-Image (--model_version original, also right for Qwen-Image-2512).")
    cfg._resolved_version = version
    return version
