"""Options of `cache-latents`, `cache-text` and `dataset check` (musubi-tuner's flag names)."""

from __future__ import annotations

import os
from dataclasses import dataclass

from flowtuner.config.fields import opt
from flowtuner.config.models import ModelVersion

DEFAULT_WORKERS = max(1, (os.cpu_count() or 2) - 1)


@dataclass
class ModelSlots:
    model: str | None = opt(help="Hugging Face repo root; fills the model slots not given")
    comfyui_dir: str | None = opt(help="ComfyUI install where bare file names resolve (default: $COMFYUI_PATH)")


@dataclass
class CacheCommon:
    dataset_config: str = opt(None, "dataset config (musubi-tuner TOML or JSON)", required=True)
    device: str | None = opt(help="device (default: cuda when available)")
    batch_size: int | None = opt(help="items per encoder batch (default: the dataset's batch_size)")
    num_workers: int = opt(DEFAULT_WORKERS, "image loading threads")
    skip_existing: bool = opt(False, "keep existing cache files even when stale (musubi-tuner's behaviour); by default stale ones are recomputed")
    keep_cache: bool = opt(False, "keep cache files the dataset no longer produces (default: remove them)")
    to_shards: str | None = opt(help="then write every item with both caches (latent and text) to cache shards at this folder or "
                                     "s3://bucket/prefix (a Lance dataset; replaces what is there), for training with the "
                                     "dataset key shards = ...; needs pip install 'flowtuner[streaming]' (docs/scale.md, Streaming)")


@dataclass
class CacheLatentsConfig(ModelVersion, CacheCommon, ModelSlots):
    vae: str | None = opt(help="VAE weights (diffusers or Wan-2.1 layout)")


@dataclass
class CacheTextConfig(ModelVersion, CacheCommon, ModelSlots):
    text_encoder: str | None = opt(help="Qwen2.5-VL weights")
    tokenizer: str | None = opt(help="tokenizer folder (default: searched, see generate --help)")
    fp8_vl: bool = opt(False, "store the text encoder's decoder Linears in fp8 (about half its memory); the cached "
                                  "embeddings stay bf16")


@dataclass
class DatasetCheckConfig(ModelVersion):
    dataset_config: str = opt(None, "dataset config (musubi-tuner TOML or JSON)", required=True)
    preview: str | None = opt(help="write contact sheets of the bucketed, cropped images to this folder")
    num_workers: int = opt(DEFAULT_WORKERS, "image reading threads")
