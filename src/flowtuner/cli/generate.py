"""`flowtuner generate`: text-to-image, img2img and inpainting with musubi-tuner's flags."""

from __future__ import annotations

import argparse

from flowtuner.config.fields import add_arguments, from_namespace
from flowtuner.config.generate import GenerateConfig
from flowtuner.config.models import resolve_model_version
from flowtuner.config.musubi import GENERATE, add_musubi_flags, apply_musubi_flags
from flowtuner.config.sampling import PRESETS


def register(sub) -> None:
    from flowtuner.config.sampling import describe_sampling

    parser = sub.add_parser(
        "generate", help="generate images from prompts (text-to-image, img2img, inpainting)",
        description="Generate images with a Qwen-Image model. Default: flow-match Euler on Qwen-Image's diffusers "
                    "schedule with true CFG (norm rescale), the same latents as diffusers' QwenImagePipeline.",
        epilog=describe_sampling(), formatter_class=_RawEpilog)
    add_arguments(parser, GenerateConfig)
    add_musubi_flags(parser, GENERATE)
    parser.set_defaults(handler=lambda args, p=parser: run(args, p))


class _RawEpilog(argparse.HelpFormatter):
    """Keeps the epilog's line breaks (the sampler / scheduler / guidance tables)."""

    def _fill_text(self, text, width, indent):
        return "".join(indent + line for line in text.splitlines(keepends=True))


def apply_preset(args, parser):
    """A preset's values become the parser's defaults, then the command line is parsed again: explicit
    flags win (the same mechanism as `train --config_file`)."""
    if not args.preset:
        return args
    parser.set_defaults(**PRESETS[args.preset])
    return parser.parse_args(args.subcommand_argv)


def configure(args) -> GenerateConfig:
    resolve_model_version(args)  # first: an unavailable model is the error that matters most
    apply_musubi_flags(args, GENERATE)
    return from_namespace(GenerateConfig, args)


def run(args, parser) -> int:
    from flowtuner.generate import run as generate

    for path in generate(configure(apply_preset(args, parser))):
        print(path)
    return 0
