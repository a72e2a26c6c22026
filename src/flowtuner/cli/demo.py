"""`flowtuner demo`: dataset check, caching, training and sampling on tiny models, on the CPU."""

from __future__ import annotations

from flowtuner.config.fields import add_arguments, from_namespace
from flowtuner.demo.config import DemoConfig


def register(sub) -> None:
    p = sub.add_parser("demo", help="run the whole path on a procedural dataset and tiny models (CPU, minutes)",
                       description="Builds a procedural dataset and a tiny model set of the real architectures locally, "
                                   "then runs dataset check, caching, training and sampling through the CLI, and scores "
                                   "the samples with a colour classifier. Exit code 1 when the score misses the goal (80%).")
    add_arguments(p, DemoConfig)
    p.set_defaults(handler=run)


def run(args) -> int:
    from flowtuner.demo.runner import run_demo

    summary = run_demo(from_namespace(DemoConfig, args))
    return 0 if summary["passed"] else 1
