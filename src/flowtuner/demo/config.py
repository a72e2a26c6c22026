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
    family: str = opt("qwen_image", "model family: qwen_image (the tiny Qwen-Image above) or sdxl (a tiny SDXL trained "
                                    "as an eps-prediction model, then converted into a flow model: the bigASP v2.5 recipe)",
                      choices=("qwen_image", "sdxl"))
    eps_steps: int = opt(600, "--family sdxl: steps of the eps-prediction stage before the conversion (--train_steps are "
                              "the conversion's)")
    flow_shift: float = opt(3.0, "--family sdxl: SD3 shift of the flow model's sampling schedule (--preset bigasp's "
                                 "euler / normal; the preset's own shift is 6)")
    tokenizer: str | None = opt(help="--family sdxl: a folder with the real CLIP tokenizer (vocab.json, merges.txt); "
                                     "default: the demo builds a CLIP-format vocabulary of its own words")
    device: str = opt("cpu", "device for caching, training and sampling, e.g. cuda; the tiny VAE is always trained "
                             "on the CPU")

    def check(self) -> None:
        if self.family != "sdxl":
            given = [n for n, v in (("eps_steps", self.eps_steps != 600), ("flow_shift", self.flow_shift != 3.0),
                                    ("tokenizer", self.tokenizer)) if v]
            if given:
                raise ConfigError(f"--{given[0]}: applies to --family sdxl only.")
        elif self.edit:
            raise ConfigError("--edit: the edit demo is Qwen-Image-Edit's; drop --edit or --family sdxl.")
        if self.flow_shift <= 0:
            raise ConfigError(f"--flow_shift {self.flow_shift}: must be positive.")
        for name in ("vae_steps", "train_steps", "eps_steps", "batch_size", "sample_steps", "samples_per_prompt"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name} {getattr(self, name)}: must be at least 1.")
        if self.learning_rate <= 0:
            raise ConfigError(f"--learning_rate {self.learning_rate}: must be positive.")
