"""`flowtuner sigmas`: print (and plot) sigma schedules, to compare schedulers."""

from __future__ import annotations

import dataclasses
import json

from flowtuner.config.fields import add_arguments
from flowtuner.config.models import ModelVersion
from flowtuner.config.sampling import ScheduleConfig
from flowtuner.errors import ConfigError


def register(sub) -> None:
    p = sub.add_parser("sigmas", help="print sigma schedules as JSON (and plot them)",
                       description="Schedules of ComfyUI's schedulers over a flow model's sigma table, and flowtuner's "
                                   "`reference` (Qwen-Image's diffusers schedule), with generate's schedule flags; "
                                   "each flag applies to the schedulers it fits.")
    add_arguments(p, ScheduleConfig, skip=("scheduler",))
    add_arguments(p, ModelVersion)
    p.add_argument("--scheduler", nargs="+", default=["reference"],
                   help="one or more of: reference, simple, normal, sgm_uniform, beta, karras, exponential, kl_optimal, linear_quadratic")
    p.add_argument("--steps", type=int, default=25, help="sampling steps (default: 25)")
    p.add_argument("--image_size", "--image-size", type=int, nargs=2, default=[1024, 1024], metavar=("H", "W"),
                   help="image size: sets the dynamic shift of `reference` and of --model_sampling flux (default: 1024 1024)")
    p.add_argument("--plot", help="write a PNG with the schedules")
    p.set_defaults(handler=run)


def run(args) -> int:
    from flowtuner.families import family_for
    from flowtuner.sampling import check_schedule, comfy_table, schedule

    family = family_for(args)
    height, width = args.image_size
    if args.steps < 1:
        raise ConfigError(f"--steps must be >= 1, got {args.steps}.")
    if min(height, width) < family.size_step:
        raise ConfigError(f"--image_size {height} {width}: each side must be at least {family.size_step} pixels.")
    tokens = (height // family.size_step) * (width // family.size_step)
    base = ScheduleConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(ScheduleConfig) if f.name != "scheduler"})
    out, tables = {}, set()
    for name in args.scheduler:  # each flag applies to the schedulers it fits
        fits = ({"shift": None, "mu": None, "model_sampling": "default"} if name == "reference"
                else {"flow_shift": None, "shift_terminal": None})
        cfg = dataclasses.replace(base, scheduler=name, **fits)
        check_schedule(cfg)
        out[name] = schedule(family, cfg, args.steps, height, width, tokens)[0].tolist()
        if name != "reference":
            tables.add(comfy_table(family, cfg, height, width).name)
    print(json.dumps(out))
    if args.plot:
        from flowtuner.plots import line_plot

        series = {k: (list(range(len(v))), v) for k, v in out.items()}
        line_plot(series, args.plot, f"sigma schedules, {args.steps} steps, {', '.join(sorted(tables)) or 'reference'}", "step", "sigma")
    return 0
