"""`flowtuner sigmas`: print (and plot) sigma schedules, to compare schedulers."""

from __future__ import annotations

import json


def register(sub) -> None:
    p = sub.add_parser("sigmas", help="print sigma schedules as JSON (and plot them)",
                       description="Schedules of ComfyUI's schedulers over a flow model's sigma table, and flowtuner's "
                                   "`reference` (Qwen-Image's diffusers schedule).")
    p.add_argument("--scheduler", nargs="+", default=["reference"],
                   help="one or more of: reference, simple, normal, sgm_uniform, beta, karras, exponential, kl_optimal, linear_quadratic")
    p.add_argument("--steps", type=int, default=25, help="sampling steps")
    p.add_argument("--shift", type=float, help="AuraFlow-style shift of the sigma table (ComfyUI ModelSamplingAuraFlow); "
                                               "with `reference`, a fixed SD3 shift instead of the dynamic one")
    p.add_argument("--mu", type=float, default=1.15, help="Flux-style table exponent when --shift is not given (ComfyUI's Qwen default 1.15)")
    p.add_argument("--image_size", "--image-size", type=int, nargs=2, default=[1024, 1024], metavar=("H", "W"),
                   help="image size: sets the dynamic shift of `reference`")
    p.add_argument("--plot", help="write a PNG with the schedules")
    p.set_defaults(handler=run)


def run(args) -> int:
    from flowtuner.errors import ConfigError
    from flowtuner.flow.model_sampling import aura_flow, flux
    from flowtuner.flow.schedulers import SCHEDULERS
    from flowtuner.flow.schedules import reference_sigmas

    ms = aura_flow(args.shift) if args.shift is not None else flux(args.mu)
    tokens = (args.image_size[0] // 16) * (args.image_size[1] // 16)
    out = {}
    for name in args.scheduler:
        if name == "reference":
            out[name] = reference_sigmas(args.steps, tokens, args.shift).tolist()
        elif name in SCHEDULERS:
            out[name] = SCHEDULERS[name](ms, args.steps).tolist()
        else:
            raise ConfigError(f"--scheduler {name}: unknown; choose from reference, {', '.join(SCHEDULERS)}.")
    print(json.dumps(out))
    if args.plot:
        from flowtuner.plots import line_plot

        series = {k: (list(range(len(v))), v) for k, v in out.items()}
        line_plot(series, args.plot, f"sigma schedules, {args.steps} steps, {ms.name}", "step", "sigma")
    return 0
