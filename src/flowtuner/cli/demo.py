"""`flowtuner demo`: dataset check, caching, training and sampling on tiny models, on the CPU."""

from __future__ import annotations

from pathlib import Path


def register(sub) -> None:
    p = sub.add_parser("demo", help="run the whole path on a procedural dataset and tiny models (CPU, minutes)",
                       description="Builds a procedural dataset and a tiny model set of the real architectures locally, "
                                   "then runs dataset check, caching, training and sampling through the CLI, and scores "
                                   "the samples with a colour classifier. Exit code 1 when the score misses the goal.")
    p.add_argument("--output_dir", "--output-dir", default="demo_output", help="folder for everything the demo writes (replaced)")
    p.add_argument("--seed", type=int, default=0, help="seed for the data, the models and training")
    p.add_argument("--train_steps", "--train-steps", type=int, default=3000, help="training steps")
    p.add_argument("--vae_steps", "--vae-steps", type=int, default=1200, help="steps of VAE reconstruction training")
    p.add_argument("--device", default="cpu", help="device for caching, training and sampling, e.g. cuda (default: cpu; "
                                                   "the tiny VAE is always trained on the CPU)")
    p.set_defaults(handler=run)


def run(args) -> int:
    from flowtuner.demo.runner import DemoConfig, run_demo

    summary = run_demo(DemoConfig(Path(args.output_dir), seed=args.seed, train_steps=args.train_steps, vae_steps=args.vae_steps,
                                     device=args.device))
    return 0 if summary["passed"] else 1
