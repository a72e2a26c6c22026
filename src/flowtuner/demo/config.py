"""The demo's settings; every field is a `flowtuner demo` flag (README lists them)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from flowtuner.config.fields import opt
from flowtuner.errors import ConfigError

# Settings whose measured best differs by family (docs/training.md "The demo recipe", docs/sdxl.md "Demo"):
# a flag left unset takes its family's value.
FAMILY_DEFAULTS = {
    "qwen_image": {"vae_steps": 800, "train_steps": 1500, "learning_rate": 4e-3},
    "sdxl": {"vae_steps": 400, "train_steps": 500, "learning_rate": 1e-3, "eps_steps": 300, "flow_shift": 3.0},
}
SDXL_ONLY = ("eps_steps", "flow_shift", "tokenizer")


@dataclass
class DemoConfig:
    output_dir: str = opt("demo_output", "folder for everything the demo writes (replaced)")
    seed: int = opt(0, "seed of the data, the models, training and the sampling noise (default: 0)")
    family: str = opt("qwen_image", "model family: qwen_image (a tiny Qwen-Image) or sdxl (a tiny SDXL trained as an "
                                    "eps-prediction model, then converted into a flow model: the bigASP v2.5 recipe)",
                      choices=tuple(FAMILY_DEFAULTS))
    vae_steps: int | None = opt(help="steps of VAE reconstruction training (batches of 16 random 32x32 crops; "
                                     "default 800, sdxl 400)")
    train_steps: int | None = opt(help="training steps (`flowtuner finetune`: full fine-tune, cosine decay after a 5% "
                                       "warm-up); qwen_image: the DiT's, sigmas drawn with --timestep_sampling shift "
                                       "--discrete_flow_shift 3 (default 1500); sdxl: the flow conversion's, "
                                       "--prediction_type flow (default 500)")
    batch_size: int = opt(32, "training batch size")
    learning_rate: float | None = opt(help="training learning rate (default 4e-3, sdxl 1e-3)")
    eps_steps: int | None = opt(help="--family sdxl: steps of the eps-prediction stage before the conversion "
                                     "(default 300)")
    flow_shift: float | None = opt(help="--family sdxl: SD3 shift of the flow model's sampling schedule (--preset "
                                        "bigasp's euler / normal, whose own shift is 6; default 3)")
    tokenizer: str | None = opt(help="--family sdxl: a folder with the real CLIP tokenizer (vocab.json, merges.txt); "
                                     "default: the demo builds a CLIP-format vocabulary of its own words")
    sample_steps: int = opt(20, "sampling steps per image")
    samples_per_prompt: int = opt(4, "images per prompt (12 prompts: every colour and shape)")
    edit: bool = opt(False, "learn an edit instead (Qwen-Image-Edit-2509 architecture): \"make the <shape> <colour>\" on a "
                            "control image of the shape in another colour; scored by the colour the shape takes")
    device: str = opt("cpu", "device for caching, training and sampling, e.g. cuda; the tiny VAE is always trained "
                             "on the CPU")

    def check(self) -> "DemoConfig":
        """The settings with the family's defaults filled in; a bad one is a ConfigError."""
        given = [name for name in SDXL_ONLY if getattr(self, name) is not None]
        if self.family != "sdxl" and given:
            raise ConfigError(f"--{given[0]}: applies to --family sdxl only.")
        if self.family == "sdxl" and self.edit:
            raise ConfigError("--edit: the edit demo is Qwen-Image-Edit's; drop --edit or --family sdxl.")
        cfg = dataclasses.replace(self, **{k: v for k, v in FAMILY_DEFAULTS[self.family].items()
                                          if getattr(self, k) is None})
        steps = ("vae_steps", "train_steps", "batch_size", "sample_steps", "samples_per_prompt")
        for name in steps + (("eps_steps",) if cfg.family == "sdxl" else ()):
            if getattr(cfg, name) < 1:
                raise ConfigError(f"--{name} {getattr(cfg, name)}: must be at least 1.")
        for name in ("learning_rate", "flow_shift"):
            if getattr(cfg, name) is not None and getattr(cfg, name) <= 0:
                raise ConfigError(f"--{name} {getattr(cfg, name)}: must be positive.")
        return cfg
