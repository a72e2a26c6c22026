"""Prompt variants: cache-text writes K recipe prompts per item (dataset option prompt_variants), each encoded at the
item's chunk count; the loader trains one per (seed, epoch, item), the same after a resume."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest
import torch
from PIL import Image

from flowtuner.data.cache import read_provenance, save_latent_cache, save_text_cache
from flowtuner.errors import ConfigError
from flowtuner.weights.reader import open_checkpoint
from tests.shared import shared_path

LONG = ("a very detailed photograph of a small red wooden house standing alone on a green hill under a wide blue "
        "sky with white clouds, tall grass moving in the wind, a narrow dirt path leading up to the door, warm "
        "evening light, long shadows, birds flying far away, a wooden fence along the path, a small pond with ducks, "
        "an old oak tree beside the house, smoke rising from the chimney, mountains far behind")


def _jsonl_dataset(root, lines, variants: int):
    images = root / "images"
    images.mkdir(exist_ok=True)
    for i, line in enumerate(lines):
        Image.fromarray(np.full((64, 64, 3), 40 * i, np.uint8)).save(images / f"i{i}.png")
        line["image_path"] = str(images / f"i{i}.png")
    (root / "items.jsonl").write_text("\n".join(json.dumps(x) for x in lines))
    cfg = root / "dataset.toml"
    cfg.write_text(f'[general]\nresolution = 64\nprompt_variants = {variants}\n\n[[datasets]]\n'
                   f'image_jsonl_file = "{root / "items.jsonl"}"\ncache_directory = "{root / "cache"}"\n')
    from flowtuner.data.config import load_dataset_config

    return load_dataset_config(cfg)


@pytest.fixture(scope="module")
def sdxl(tmp_path_factory):
    from flowtuner.families.sdxl.family import SDXLFamily
    from tests.sdxl_models import tiny_clip_g, tiny_clip_l, tiny_unet, tiny_vae, write_single_file

    root = tmp_path_factory.mktemp("variants")
    ckpt = write_single_file(root / "tiny.safetensors", tiny_unet(2), tiny_vae(3), tiny_clip_l(0), tiny_clip_g(1))
    family = SDXLFamily()
    return family, family.resolve_paths(model=ckpt, tokenizer=shared_path("fixtures/tokenizers/clip"))


def test_cache_text_writes_k_variants_at_the_items_chunk_count(tmp_path, sdxl):
    from flowtuner.data.caching import cache_text
    from flowtuner.data.sources import collect_items
    from flowtuner.families.sdxl.prompts import PromptBuilder, recipe_item

    family, paths = sdxl
    lines = [{"caption": "a red square", "tags": "red, square, simple background, watermark", "score": 7},
             {"caption": LONG, "tags": ", ".join(f"tag number {i}" for i in range(40)), "score": 2},
             {"caption": "a blue circle", "score": 5}]  # no tags column: that item fails with one line
    datasets = _jsonl_dataset(tmp_path, lines, variants=6)
    summary = cache_text(datasets, family, paths, torch.device("cpu"))
    assert (summary.cached, len(summary.failed)) == (2, 1)
    assert "no 'tags'" in summary.failed[0][1] and summary.failed[0][0].name == "i2.png"

    encoder = family.load_text_encoder(paths, torch.device("cpu"))
    builder = PromptBuilder(encoder.tokens.tokenizer)
    items, _ = collect_items(datasets[0])
    chunk_counts = []
    for item in items[:2]:
        path = tmp_path / "cache" / f"{item.key}_sdxl_te.safetensors"
        ckpt = open_checkpoint(path)
        n, expected = builder.variants(recipe_item(item), item.key, 0, 6)
        chunk_counts.append(n)
        assert read_provenance(ckpt.metadata)["prompts"] == expected
        assert sorted(ckpt.keys()) == sorted([f"{p}{name}_bfloat16" for p in ["", *(f"v{k}." for k in range(1, 6))]
                                              for name in ("prompt_embeds", "pooled")])
        for k, prompt in enumerate(expected):  # each variant: that prompt encoded at the item's chunk count
            ref = encoder.encode([prompt], chunks=n)[0]
            prefix = f"v{k}." if k else ""
            assert torch.equal(ckpt.read(f"{prefix}prompt_embeds_bfloat16"), ref.embeds[0].to(torch.bfloat16))
            assert torch.equal(ckpt.read(f"{prefix}pooled_bfloat16"), ref.extra["pooled"][0].to(torch.bfloat16))
        assert len(set(expected)) > 1  # the recipe varies them (caption / tag prompt / UCG)
    assert chunk_counts == [1, 2]  # the long caption's bucket: tag prompts and the caption padded to 2 chunks

    again = cache_text(datasets, family, paths, torch.device("cpu"))
    assert (again.cached, again.fresh) == (0, 2)
    fewer = cache_text(_jsonl_dataset(tmp_path, lines[:2], variants=2), family, paths, torch.device("cpu"))
    assert (fewer.cached, dict(fewer.stale_reasons)) == (2, {"prompt_variants changed": 2})
    assert len(open_checkpoint(tmp_path / "cache" / "i0_sdxl_te.safetensors").keys()) == 4


def test_one_variant_is_the_plain_cache_and_a_family_without_a_recipe_refuses(tmp_path):
    from flowtuner.data.caching import _variant_record
    from flowtuner.data.sources import Item
    from flowtuner.families.qwen_image.family import QwenImageFamily

    ds = _jsonl_dataset(tmp_path, [{"caption": "c", "tags": "t", "score": 3}], variants=1)[0]
    qwen, item = QwenImageFamily(), Item("i0", tmp_path / "images/i0.png", "c", tags="t", score=3)
    assert _variant_record(ds, item, qwen) == {}  # the Qwen caches' record, unchanged
    assert qwen.prompt_variants(item, 1, 0, encoder=None).prompts == ["c"]
    ds.prompt_variants = 2
    with pytest.raises(ConfigError, match="prompt_variants = 2: the qwen_image model has no prompt recipe"):
        _variant_record(ds, item, qwen)
    with pytest.raises(ConfigError, match="no prompt recipe"):
        qwen.prompt_variants(item, 2, 0, encoder=None)


def test_dataset_option_is_checked(tmp_path):
    with pytest.raises(ConfigError, match="'prompt_variants' must be >= 1, got 0"):
        _jsonl_dataset(tmp_path, [{"caption": "c"}], variants=0)


# ------------------------------------------------------------------------------------ the loader's choice
K = 4


def _variant_caches(root, keys, chunks=None):
    """Caches whose variant k has prompt_embeds filled with k (the loader's pick is read back from the batch)."""
    for i, key in enumerate(keys):
        save_latent_cache(root / f"{key}_0064x0064_sdxl.safetensors", torch.zeros(4, 1, 8, 8), "sdxl", (64, 64), {})
        tensors = {}
        for k in range(K):
            n = (chunks or {}).get((key, k), 1)
            prefix = f"v{k}." if k else ""
            tensors[prefix + "prompt_embeds"] = torch.full((77 * n, 8), float(k), dtype=torch.bfloat16)
            tensors[prefix + "pooled"] = torch.full((4,), float(k), dtype=torch.bfloat16)
        save_text_cache(root / f"{key}_sdxl_te.safetensors", tensors, "sdxl", "c", {})


def _plan(root, seed):
    from flowtuner.data.config import load_dataset_config
    from flowtuner.data.loader import BatchPlan, CacheDataset, scan_caches
    from flowtuner.families.sdxl.family import SDXLFamily

    Image.new("RGB", (64, 64)).save(root / "x.png")
    cfg = root / "d.toml"
    cfg.write_text(f'[general]\nresolution = 64\nbatch_size = 2\n[[datasets]]\nimage_directory = "{root}"\n'
                   f'cache_directory = "{root}"\n')
    ds = load_dataset_config(cfg)
    items = scan_caches(ds, SDXLFamily())
    return CacheDataset(items, SDXLFamily()), BatchPlan(items, ds, seed)


def _picks(data, plan, epoch, start=0, workers=0):
    from flowtuner.data.loader import make_loader

    out = {}
    for batch in make_loader(data, plan, epoch, start, workers):
        for key, embeds, pooled in zip(batch["keys"], batch["cond"].embeds, batch["cond"].extra["pooled"]):
            assert embeds.unique().tolist() == pooled.unique().tolist()  # one variant's tensors together
            out[key] = int(embeds[0, 0])
    return out


def test_the_loader_picks_one_variant_per_seed_epoch_and_item(tmp_path):
    from flowtuner.data.loader import variant_choice

    keys = [f"k{i}" for i in range(8)]
    _variant_caches(tmp_path, keys)
    data, plan = _plan(tmp_path, seed=7)
    epochs = [_picks(data, plan, e) for e in range(6)]
    for e, picks in enumerate(epochs):
        assert picks == {key: variant_choice(7, e, key, K) for key in keys}
    assert all(len({picks[key] for picks in epochs}) > 1 for key in keys)  # varies over the epochs
    assert set(Counter(p for picks in epochs for p in picks.values())) == set(range(K))  # every variant is trained
    # deterministic: another dataset object, reader threads, a resumed epoch (from batch 2) pick the same
    again, plan_again = _plan(tmp_path, seed=7)
    assert _picks(again, plan_again, 3, workers=2) == epochs[3]
    resumed = _picks(again, plan_again, 3, start=2)
    assert resumed and all(epochs[3][k] == v for k, v in resumed.items())
    other = _plan(tmp_path, seed=8)
    assert [_picks(*other, e) for e in range(6)] != epochs  # the run's seed takes part


def test_variants_of_one_item_must_share_its_chunk_count(tmp_path):
    from flowtuner.data.loader import CacheError

    _variant_caches(tmp_path, ["a", "b"], chunks={("b", 2): 2})
    with pytest.raises(CacheError, match="prompt variant 2's prompt_embeds is \\[154, 8\\], variant 0's \\[77, 8\\]"):
        _plan(tmp_path, seed=0)
