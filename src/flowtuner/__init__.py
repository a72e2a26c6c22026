"""flowtuner: fine-tune and run flow-matching image diffusion models."""

__version__ = "0.1.0"
