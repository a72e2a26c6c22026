"""The SDXL family: loading (checkpoint, keys, configs, unet, vae, text_models), detection, text encoding."""
