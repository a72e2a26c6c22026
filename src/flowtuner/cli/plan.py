"""`flowtuner plan train|finetune|generate`: the peak device and host memory of one step, before a run, with
the same flags as the command it plans (plus the sizes a dataset config or the prompt would decide)."""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass

from flowtuner.config.fields import add_arguments, from_namespace, opt
from flowtuner.config.generate import GenerateConfig
from flowtuner.config.models import resolve_model_version
from flowtuner.config.musubi import GENERATE, TRAIN, add_musubi_flags, apply_musubi_flags
from flowtuner.config.train import TrainConfig
from flowtuner.errors import ConfigError


@dataclass
class PlanOptions:
    resolution: list[int] | None = opt(help="plan train / finetune: image size as W H, musubi-tuner's dataset order "
                                            "(default: the first dataset of --dataset_config, else 1024 1024)",
                                       nargs=2, metavar=("W", "H"))
    batch_size: int | None = opt(help="plan train / finetune: items per batch (default: the first dataset's, else 1)")
    text_tokens: int = opt(256, "prompt length in tokens the plan assumes (captions vary; Qwen-Image reads up to 1024)")
    json: bool = opt(False, "print one JSON object: device_peak_gib, host_peak_gib, components, host_components, settings")


# planned command -> (its config, its musubi-tuner flag table)
TARGETS = {"train": (TrainConfig, TRAIN), "finetune": (TrainConfig, TRAIN), "generate": (GenerateConfig, GENERATE)}


def register(sub) -> None:
    parser = sub.add_parser("plan", help="the device and host memory one training / generation step needs",
                            description="Peak device and host memory of one step, by component, from the real model "
                                        "code run on fake tensors (no weights are read; see docs/memory.md).")
    targets = parser.add_subparsers(dest="plan_target", metavar="COMMAND", required=True)
    for name, (cls, table) in TARGETS.items():
        p = targets.add_parser(name, help=f"plan `flowtuner {name}` (its flags)")
        add_arguments(p, cls)
        add_arguments(p, PlanOptions)
        add_musubi_flags(p, table)  # musubi-tuner command lines plan unchanged
        p.set_defaults(handler=lambda args, n=name: run(args, n))


def _size(args, target: str) -> tuple[int, int, int]:
    """(height, width, batch) of the planned step."""
    if target == "generate":
        h, w = args.image_size or (1024, 1024)
        return h, w, 1
    w, h, batch = 1024, 1024, 1
    if args.dataset_config:
        from flowtuner.data.config import load_dataset_config

        first = load_dataset_config(args.dataset_config)[0]
        (w, h), batch = first.resolution, first.batch_size
    if args.resolution:
        w, h = args.resolution
    return h, w, batch if args.batch_size is None else args.batch_size


def settings_of(args, target: str):
    from flowtuner.plan import PlanSettings, train_settings

    h, w, batch = _size(args, target)
    if h % 16 or w % 16 or h < 16 or w < 16:
        raise ConfigError(f"size {w}x{h}: width and height must be positive multiples of 16.")
    if target == "generate":
        scaled = bool(getattr(args, "fp8_scaled", False))
        return PlanSettings("generate", h, w, batch, args.text_tokens, fp8_base=scaled or bool(getattr(args, "fp8_base", False)),
                            fp8_scaled=scaled, blocks_to_swap=args.blocks_to_swap)
    return train_settings(from_namespace(TrainConfig, args), target, h, w, batch, args.text_tokens)


def run(args: argparse.Namespace, target: str) -> int:
    from flowtuner.families import family_for
    from flowtuner.plan import make_plan

    resolve_model_version(args)
    apply_musubi_flags(args, TARGETS[target][1])
    family = family_for(args)
    given = any(getattr(args, k) for k in ("dit", "model", "text_encoder", "vae"))
    paths = family.resolve_paths(dit=args.dit, vae=args.vae, text_encoder=args.text_encoder, tokenizer=None,
                                 model=args.model, comfyui_dir=args.comfyui_dir) if given else None
    plan = make_plan(family.plan_spec(paths), settings_of(args, target))
    print(json.dumps(plan.as_json()) if args.json else plan.text())
    return 0
