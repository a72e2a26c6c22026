"""The demo's settings; every field is a `flowtuner demo` flag (README lists them)."""

from __future__ import annotations

from dataclasses import dataclass

from flowtuner.config.fields import opt
from flowtuner.errors import ConfigError


@dataclass
class DemoConfig:
    output_dir: str = opt("demo_output", "folder for everything the demo writes (replaced)")
    seed: int = opt(0, "seed of the data, the models, training and the sampling noise (default: 0)")
    vae_steps: int = opt(800, "steps of VAE reconstruction training (batches of 16 random 32x32 crops)")
    train_steps: int = opt(1500, "DiT training steps (`flowtuner finetune`: full fine-tune, cosine decay after a 5% "
                                 "warm-up, sigmas drawn with --timestep_sampling shift --discrete_flow_shift 3)")
    batch_size: int = opt(32, "DiT training batch size")
    learning_rate: float = opt(4e-3, "DiT learning rate")
    sample_steps: int = opt(20, "sampling steps per image")
    samples_per_prompt: int = opt(4, "images per prompt (12 prompts: every colour and shape)")
    edit: bool = opt(False, "learn an edit instead (Qwen-Image-Edit-2509 architecture): \"make the <shape> <colour>\" on a "
                            "control image of the shape in another colour; scored by the colour the shape takes")
    device: str = opt("cpu", "device for caching, training and sampling, e.g. cuda; the tiny VAE is always trained "
                             "on the CPU")

    def check(self) -> None:
        for name in ("vae_steps", "train_steps", "batch_size", "sample_steps", "samples_per_prompt"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name} {getattr(self, name)}: must be at least 1.")
        if self.learning_rate <= 0:
            raise ConfigError(f"--learning_rate {self.learning_rate}: must be positive.")
