"""`flowtuner generate`: text-to-image with musubi-tuner's flags."""

from __future__ import annotations

from flowtuner.config.fields import add_arguments, from_namespace
from flowtuner.config.generate import GenerateConfig


def register(sub) -> None:
    parser = sub.add_parser("generate", help="generate images from prompts",
                            description="Generate images with a Qwen-Image model (flow-match Euler, true CFG).")
    add_arguments(parser, GenerateConfig)
    parser.set_defaults(handler=run)


def run(args) -> int:
    from flowtuner.generate import run as generate

    for path in generate(from_namespace(GenerateConfig, args)):
        print(path)
    return 0
