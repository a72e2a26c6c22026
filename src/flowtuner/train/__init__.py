"""Training: the loop (LoRA and full share it), LoRA network and file formats, optimizers, LR
schedules, save / resume state."""
