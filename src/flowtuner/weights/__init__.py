"""Reading and writing checkpoint files. Knows files and tensors, not models."""

from flowtuner.weights.reader import Checkpoint, open_checkpoint
from flowtuner.weights.writer import atomic_save_safetensors, atomic_write_bytes

__all__ = ["Checkpoint", "open_checkpoint", "atomic_save_safetensors", "atomic_write_bytes"]
