"""`flowtuner cache-latents` and `flowtuner cache-text`."""

from __future__ import annotations

from flowtuner.config.caching import CacheLatentsConfig, CacheTextConfig
from flowtuner.config.fields import add_arguments, from_namespace
from flowtuner.config.models import resolve_model_version
from flowtuner.config.musubi import CACHE_LATENTS, CACHE_TEXT, add_musubi_flags, apply_musubi_flags


def register(sub) -> None:
    for name, cls, table, help_text in (
            ("cache-latents", CacheLatentsConfig, CACHE_LATENTS, "encode dataset images to latent caches"),
            ("cache-text", CacheTextConfig, CACHE_TEXT, "encode dataset captions to text-encoder caches")):
        parser = sub.add_parser(name, help=help_text, description=help_text + "; only missing or stale caches are computed "
                                "(musubi-tuner's qwen_image_cache_*.py flags)")
        add_arguments(parser, cls)
        add_musubi_flags(parser, table)
        parser.set_defaults(handler=lambda args, cls=cls, table=table: run(configure(args, cls, table)))


def configure(args, cls, table):
    resolve_model_version(args)  # first: an unavailable model is the error that matters most
    apply_musubi_flags(args, table)
    return from_namespace(cls, args)


def run(cfg) -> int:
    from flowtuner.data.caching import cache_latents, cache_text
    from flowtuner.data.distributed import refuse_several_processes
    from flowtuner.data.config import load_dataset_config
    from flowtuner.errors import ConfigError
    from flowtuner.families import family_for
    from flowtuner.generate import pick_device
    from flowtuner.weights.fp8 import fp8_text_encoder

    refuse_several_processes("cache-latents" if isinstance(cfg, CacheLatentsConfig) else "cache-text")
    datasets = load_dataset_config(cfg.dataset_config, {"batch_size": cfg.batch_size})
    family = family_for(cfg)
    for ds in datasets:
        if ds.image_directory is None and ds.image_jsonl_file is None:
            raise ConfigError(f"{cfg.dataset_config}: {ds.name} has only 'shards'; caching needs its images "
                              "(image_directory or image_jsonl_file).")
    if isinstance(cfg, CacheLatentsConfig):
        paths = family.resolve_paths(vae=cfg.vae, model=cfg.model, comfyui_dir=cfg.comfyui_dir)
        summary = cache_latents(datasets, family, paths, pick_device(cfg.device), cfg.batch_size, cfg.num_workers,
                                cfg.skip_existing, cfg.keep_cache)
    else:
        paths = family.resolve_paths(text_encoder=cfg.text_encoder, tokenizer=cfg.tokenizer, model=cfg.model,
                                     comfyui_dir=cfg.comfyui_dir)
        with fp8_text_encoder(cfg.fp8_vl):
            summary = cache_text(datasets, family, paths, pick_device(cfg.device), cfg.batch_size, cfg.skip_existing, cfg.keep_cache)
    print("\n".join(summary.lines()))
    if cfg.to_shards:
        from flowtuner.data.streaming import write_shards

        print(f"shards: {write_shards(datasets, family, cfg.to_shards)} items written to {cfg.to_shards}")
    return 1 if summary.failed else 0
