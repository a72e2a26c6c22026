"""`flowtuner cache-latents` and `flowtuner cache-text`."""

from __future__ import annotations

from flowtuner.config.caching import CacheLatentsConfig, CacheTextConfig
from flowtuner.config.fields import add_arguments, from_namespace
from flowtuner.errors import ConfigError


def register(sub) -> None:
    for name, cls, help_text in (("cache-latents", CacheLatentsConfig, "encode dataset images to latent caches"),
                                 ("cache-text", CacheTextConfig, "encode dataset captions to text-encoder caches")):
        parser = sub.add_parser(name, help=help_text, description=help_text + "; only missing or stale caches are computed")
        add_arguments(parser, cls)
        parser.set_defaults(handler=lambda args, cls=cls: run(from_namespace(cls, args)))


def run(cfg) -> int:
    from flowtuner.data.caching import cache_latents, cache_text
    from flowtuner.data.config import load_dataset_config
    from flowtuner.families import get_family
    from flowtuner.generate import pick_device

    datasets = load_dataset_config(cfg.dataset_config, {"batch_size": cfg.batch_size})
    family = get_family("qwen_image")
    if isinstance(cfg, CacheLatentsConfig):
        paths = family.resolve_paths(vae=cfg.vae, model=cfg.model, comfyui_dir=cfg.comfyui_dir)
        summary = cache_latents(datasets, family, paths, pick_device(cfg.device), cfg.batch_size, cfg.num_workers,
                                cfg.skip_existing, cfg.keep_cache)
    else:
        if cfg.fp8_vl:
            raise ConfigError("--fp8_vl is not available yet (it arrives with the memory work); run without it, "
                              "or with --device cpu if the text encoder does not fit.")
        paths = family.resolve_paths(text_encoder=cfg.text_encoder, tokenizer=cfg.tokenizer, model=cfg.model,
                                     comfyui_dir=cfg.comfyui_dir)
        summary = cache_text(datasets, family, paths, pick_device(cfg.device), cfg.batch_size, cfg.skip_existing, cfg.keep_cache)
    print("\n".join(summary.lines()))
    return 1 if summary.failed else 0
