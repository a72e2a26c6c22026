"""`flowtuner train` (LoRA), `flowtuner finetune` (full), `flowtuner convert-lora`."""

from __future__ import annotations

import argparse
import dataclasses
import difflib
from pathlib import Path

from flowtuner.config.fields import add_arguments, from_namespace
from flowtuner.config.models import ModelVersion, resolve_model_version
from flowtuner.config.musubi import TRAIN, add_musubi_flags, apply_musubi_flags
from flowtuner.config.train import TrainConfig
from flowtuner.errors import ConfigError

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib


# per-command defaults that differ from the dataclass's: full fine-tuning takes musubi-tuner's learning rate
COMMAND_DEFAULTS = {"train": {}, "finetune": {"learning_rate": 2e-6}}


def register(sub) -> None:
    for name, full, text in (("train", False, "train a LoRA on cached datasets"),
                             ("finetune", True, "fine-tune all DiT weights on cached datasets")):
        parser = sub.add_parser(name, help=text, description=text + " (musubi-tuner's flags; --config_file TOML too)")
        add_arguments(parser, TrainConfig)
        add_musubi_flags(parser, TRAIN)
        parser.set_defaults(handler=lambda args, p=parser, f=full: run(args, p, f), **COMMAND_DEFAULTS[name])
    conv = sub.add_parser("convert-lora", help="convert a LoRA between the kohya, diffusers and comfyui layouts")
    conv.add_argument("input", help="LoRA file in any supported layout")
    conv.add_argument("output", help="file to write")
    conv.add_argument("--format", required=True, choices=("kohya", "diffusers", "comfyui"), help="layout of the output")
    add_arguments(conv, ModelVersion)  # the family names the LoRA's modules
    conv.set_defaults(handler=convert)


def config_file_values(path: str) -> dict:
    """TOML options, all sections flattened (musubi-tuner's convention); dashes read as underscores."""
    file = Path(path)
    if not file.exists() and file.with_suffix(".toml").exists():
        file = file.with_suffix(".toml")
    try:
        raw = tomllib.loads(file.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"--config_file {path}: cannot read it ({exc.strerror}).") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{file}: invalid TOML: {exc}.") from None
    flat: dict = {}
    for key, value in raw.items():
        flat.update(value if isinstance(value, dict) else {key: value})
    names = [f.name for f in dataclasses.fields(TrainConfig)] + list(TRAIN)
    out = {}
    for key, value in flat.items():
        key = key.replace("-", "_")
        if key not in names:
            near = difflib.get_close_matches(key, names, n=1)
            raise ConfigError(f"{file}: unknown option '{key}'" + (f"; did you mean '{near[0]}'?" if near else "."))
        out[key] = value
    return out


REFUSED_VALUES = {("log_with", "wandb"): "wandb is not available; use --log_with tensorboard",
                  ("log_with", "all"): "only tensorboard is available; use --log_with tensorboard"}


def configure(args: argparse.Namespace) -> TrainConfig:
    resolve_model_version(args)  # first: an unavailable model is the error that matters most
    apply_musubi_flags(args, TRAIN)
    cfg = from_namespace(TrainConfig, args)
    for (name, value), why in REFUSED_VALUES.items():
        if getattr(cfg, name) == value:
            raise ConfigError(f"--{name} {value}: {why}.")
    return cfg


def run(args: argparse.Namespace, parser: argparse.ArgumentParser, full: bool) -> int:
    if args.config_file:  # file values become the defaults, so every flag given on the command line wins
        parser.set_defaults(**config_file_values(args.config_file))
        args = parser.parse_args(args.subcommand_argv)
    cfg = configure(args)
    from flowtuner.train.loop import Trainer

    trainer = Trainer(cfg, full=full)
    if cfg.show_timesteps:
        return show_timesteps(trainer, cfg)
    return trainer.run()


def show_timesteps(trainer, cfg: TrainConfig) -> int:
    """musubi-tuner's `image` / `console` values, or a PNG path."""
    if cfg.show_timesteps == "console":
        print(text_histogram(trainer.timestep_draws()[0]))
        return 0
    path = Path(cfg.output_dir) / f"{cfg.output_name}_timesteps.png" if cfg.show_timesteps == "image" else cfg.show_timesteps
    print(trainer.show_timesteps(str(path)))
    return 0


def text_histogram(sigmas, bins: int = 20, width: int = 50) -> str:
    import torch

    counts = torch.histc(sigmas, bins, 0, 1)
    top = float(counts.max()) or 1.0
    return "\n".join(f"{k / bins:.2f}-{(k + 1) / bins:.2f} {'#' * round(float(c) / top * width):<{width}} {float(c) / len(sigmas):6.2%}"
                     for k, c in enumerate(counts))


def convert(args) -> int:
    from flowtuner.families import family_for
    from flowtuner.train.lora_formats import read_lora_file, write_lora_file
    from flowtuner.weights import open_checkpoint

    family = family_for(args)  # resolves --model_version
    weights = read_lora_file(args.input, *family.lora_names())
    meta = {k: v for k, v in open_checkpoint(args.input).metadata.items() if k.startswith(("ss_", "modelspec."))}
    write_lora_file(weights, args.output, args.format, meta, names=family.lora_names())
    print(f"{args.output}: {len(weights)} modules, {args.format} layout")
    return 0
