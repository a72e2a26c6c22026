"""The bigASP v2.5 data recipe: its 31 buckets and crops, chunk-count batches, the prompt builder (real CLIP
tokenizer) and the JSONL columns it reads."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from PIL import Image

from flowtuner.families.sdxl import prompts as P
from tests.shared import shared_path

RECIPE_31 = [(576, 1664), (576, 1728), (640, 1536), (640, 1600), (704, 1344), (704, 1408), (704, 1472), (768, 1280),
             (768, 1344), (832, 1152), (832, 1216), (896, 1088), (896, 1152), (960, 1024), (960, 1088), (1024, 960),
             (1024, 1024), (1088, 896), (1088, 960), (1152, 832), (1152, 896), (1216, 832), (1280, 768), (1344, 704),
             (1344, 768), (1408, 704), (1472, 704), (1536, 640), (1600, 640), (1664, 576), (1728, 576)]


@pytest.fixture(scope="module")
def clip_tok():
    from flowtuner.families.sdxl.tokenizer import load_tokenizer

    return load_tokenizer(shared_path("fixtures/tokenizers/clip/vocab.json").parent)


@pytest.fixture(scope="module")
def builder(clip_tok):
    return P.PromptBuilder(clip_tok)


TAGS = ", ".join(["1girl", "solo", "long_hair", "blue eyes", "smile", "outdoors", "sky", "cloud", "tree", "day",
                  "standing", "dress", "white dress", "flower", "holding", "looking at viewer", "watermark",
                  "grass", "wind", "hat"] + [f"extra tag {i}" for i in range(60)])


# --- quality strings, chunk counts ----------------------------------------------------------------------------
def test_quality_strings_are_the_recipes_thresholds():
    expected = ["worst quality"] * 2 + ["low quality"] * 2 + ["normal quality"] * 2 + ["high quality"] \
        + ["best quality"] * 2 + ["masterpiece quality"] * 2
    assert [P.quality_string(s) for s in range(11)] == expected
    for bad in (-1, 11, 5.5, True, "7"):
        with pytest.raises(P.PromptDataError, match="score .* 0 to 10"):
            P.quality_string(bad)


def test_chunk_count_leaves_five_tokens_for_the_quality_tag():
    assert [P.chunk_count(n) for n in (0, 70, 71, 145, 146, 220, 221, 500)] == [1, 1, 2, 2, 3, 3, 3, 3]


# --- the prompt builder ---------------------------------------------------------------------------------------
def _stats(builder, item, n=4000):
    kinds = {"caption": 0, "tags": 0, "empty": 0, "quality": 0}
    for seed in range(n):
        out = builder.prompt(item, 2, P.item_rng(seed, 0, "k"))
        kind = ("empty" if out == "" else "quality" if out == P.quality_string(item.score)
                else "caption" if out == item.caption else "tags")
        kinds[kind] += 1
    return kinds


def _within(count, n, p, sigmas=4.5):
    return abs(count - n * p) <= sigmas * math.sqrt(n * p * (1 - p))


def test_caption_tag_and_ucg_frequencies_are_the_recipes(builder):
    n = 4000
    kinds = _stats(builder, P.RecipeItem("a girl in a white dress under a blue sky", TAGS, 7), n)
    assert _within(kinds["tags"], n, 0.95 * 0.2), kinds
    assert _within(kinds["caption"], n, 0.95 * 0.8), kinds
    assert _within(kinds["empty"], n, 0.025), kinds
    assert _within(kinds["quality"], n, 0.025), kinds


def test_no_tags_means_the_caption(builder):
    kinds = _stats(builder, P.RecipeItem("a cat", "", 3), 1000)
    assert kinds["tags"] == 0 and kinds["caption"] > 900


def test_quality_tag_is_added_on_the_tag_path_ninety_percent_of_the_time(builder):
    n, hits = 3000, 0
    for seed in range(n):
        tags = builder.tag_prompt("cat, dog, tree", 9, 1, P.item_rng(seed, 0, "q"))
        hits += "masterpiece" in tags
    assert _within(hits, n, 0.9)


@pytest.mark.parametrize("n_chunks", [1, 2, 3])
def test_tag_prompts_fill_their_chunk_bucket_within_the_token_limit(builder, clip_tok, n_chunks):
    for seed in range(150):
        rng = P.item_rng(seed, 1, "t")
        out = builder.tag_prompt(TAGS, 5, n_chunks, rng)
        tags = [t.strip() for t in out.split(",")]
        # the builder's own count (tokens + 1 per non-important tag) never passes n·75, so the prompt fits n chunks
        count = len(clip_tok(out, add_special_tokens=False)["input_ids"])
        assert count <= n_chunks * P.CHUNK_TOKENS, (count, out)
        assert math.ceil(count / P.CHUNK_TOKENS) <= n_chunks
        assert len(tags) == len(set(tags))
    # and fills it: the limit is drawn from ((n-1)·75, n·75), so on average the prompt lands in its own bucket
    counts = [len(clip_tok(builder.tag_prompt(TAGS, 5, n_chunks, P.item_rng(s, 2, "t")), add_special_tokens=False)
                  ["input_ids"]) for s in range(100)]
    assert np.mean(counts) > (n_chunks - 1) * P.CHUNK_TOKENS + 10


def test_important_tags_are_always_kept(builder):
    for seed in range(300):
        out = builder.tag_prompt(TAGS, 0, 1, P.item_rng(seed, 0, "i"))
        norm = {t.strip().replace("_", " ") for t in out.split(",")}
        assert "watermark" in norm
    # even when they alone pass the limit (the minimum of 10 tokens)
    out = builder.tag_prompt("watermark, low quality, best quality, masterpiece quality, cat", 10, 1, P.item_rng(0, 0, "x"))
    assert {"watermark", "low quality", "best quality", "masterpiece quality"} <= {t.strip().replace("_", " ") for t in out.split(",")}


def test_styles_and_separators(builder):
    styles, seps = set(), {", ": 0, ",": 0}
    for seed in range(300):
        out = builder.tag_prompt("long hair, blue_eyes, white dress, cat", 5, 1, P.item_rng(seed, 0, "s"))
        parts = [t.strip() for t in out.split(",")]
        under = sum("_" in p for p in parts if p not in ("cat",))
        spaced = sum(" " in p for p in parts if p not in ("cat",))
        styles.add("under" if spaced == 0 else "space" if under == 0 else "mixed")
        seps[", "] += out.count(", ")
        seps[","] += out.count(",") - out.count(", ")
    assert styles == {"under", "space", "mixed"}
    total = seps[", "] + seps[","]
    assert _within(seps[", "], total, P.SPACE_AFTER_COMMA_PROB)


def test_prompts_are_deterministic_per_seed_variant_and_key(builder):
    item = P.RecipeItem("a long caption " * 5, TAGS, 6)
    a = builder.variants(item, "img1", seed=42, count=16)
    assert a == P.PromptBuilder(builder.tokenizer).variants(item, "img1", seed=42, count=16)
    assert a != builder.variants(item, "img1", seed=43, count=16)
    assert a != builder.variants(item, "img2", seed=42, count=16)
    assert len(set(a[1])) > 2  # the variants differ from each other


def test_item_chunk_count_comes_from_the_caption(builder):
    assert builder.n_chunks(P.RecipeItem("word " * 70, "a, b", 5)) == 1
    assert builder.n_chunks(P.RecipeItem("word " * 71, "a, b", 5)) == 2
    assert builder.n_chunks(P.RecipeItem("", "tag " * 200, 5)) == 3


# --- buckets --------------------------------------------------------------------------------------------------
def test_the_bigasp_rule_gives_exactly_the_recipes_31_buckets():
    from flowtuner.data.buckets import BUCKET_RULES

    assert BUCKET_RULES["bigasp"].buckets() == RECIPE_31


def _selector(crop="center"):
    from flowtuner.data.buckets import RuleSelector

    return RuleSelector("bigasp", crop)


def test_assignment_is_by_the_closest_aspect_ratio():
    sel = _selector()
    for w, h in [(1000, 1000), (3000, 2000), (640, 1920), (5000, 500), (1234, 987), (900, 1200)]:
        best = min(RECIPE_31, key=lambda b: abs(b[0] / b[1] - w / h))
        assert sel.select(w, h) == best
    assert sel.select(4000, 1000) == (1728, 576)


@pytest.mark.parametrize("crop", ["center", "random"])
def test_images_are_scaled_to_cover_with_lanczos_and_the_crop_recorded(crop):
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 255, (700, 1500, 3), dtype=np.uint8))  # 1500 x 700
    sel = _selector(crop)
    bucket = sel.select(1500, 700)
    pixels, (left, top) = sel.place(image, bucket, "item-a")
    assert pixels.shape == (bucket[1], bucket[0], 3)
    scale = max(bucket[0] / 1500, bucket[1] / 700)
    size = (int(1500 * scale + 0.5), int(700 * scale + 0.5))
    resized = np.asarray(image.resize(size, Image.Resampling.LANCZOS))
    assert np.array_equal(pixels, resized[top : top + bucket[1], left : left + bucket[0]])
    if crop == "center":
        assert (left, top) == ((size[0] - bucket[0]) // 2, (size[1] - bucket[1]) // 2)
    else:  # random per item, the same at every run
        assert sel.place(image, bucket, "item-a")[1] == (left, top)
        offsets = {sel.place(image, bucket, f"item-{i}")[1] for i in range(20)}
        assert len(offsets) > 5 and all(0 <= x <= size[0] - bucket[0] and y == 0 for x, y in offsets)


def _config(tmp_path, extra: str):
    from flowtuner.data.config import load_dataset_config

    (tmp_path / "img").mkdir(exist_ok=True)
    cfg = tmp_path / "d.toml"
    cfg.write_text(f'[[datasets]]\nimage_directory = "{tmp_path / "img"}"\n{extra}\n')
    return load_dataset_config(cfg)


def test_dataset_config_names_the_rule_and_refuses_bad_values(tmp_path):
    from flowtuner.errors import ConfigError

    ds = _config(tmp_path, 'bucket_rule = "bigasp"\nbucket_crop = "random"')[0]
    assert (ds.bucket_rule, ds.bucket_crop) == ("bigasp", "random")
    assert _config(tmp_path, "")[0].bucket_rule == "musubi"
    with pytest.raises(ConfigError, match="bucket_rule 'sdxl': choose one of musubi, bigasp"):
        _config(tmp_path, 'bucket_rule = "sdxl"')
    with pytest.raises(ConfigError, match="bucket_crop 'random' needs a fixed-list bucket_rule"):
        _config(tmp_path, 'bucket_crop = "random"')


def test_the_latent_cache_keeps_original_size_and_crop_for_micro_conditioning(tmp_path):
    """cache-latents' writer under the bigasp rule, read back by the loader into SDXL's conditioning."""
    import torch

    from flowtuner.data import caching
    from flowtuner.data.cache import save_text_cache
    from flowtuner.data.loader import CacheDataset, CachedItem
    from flowtuner.data.sources import Item
    from flowtuner.families.sdxl.family import SDXLFamily

    Image.fromarray(np.zeros((700, 1500, 3), np.uint8)).save(tmp_path / "a.png")
    ds = _config(tmp_path, 'bucket_rule = "bigasp"')[0]
    sel = _selector()
    task = caching.Task(ds, Item("a", tmp_path / "a.png", "cap"), tmp_path / "a_1500x0700_sdxl.safetensors", {},
                        sel.select(1500, 700), (1500, 700), selector=sel)
    _, loaded = caching._load(task)
    assert loaded.crop == sel.place(Image.open(tmp_path / "a.png"), task.bucket, "a")[1] and loaded.crop[0] > 0

    class Codec:
        def encode(self, pixels):
            return torch.zeros(pixels.shape[0], 4, 1, pixels.shape[2] // 8, pixels.shape[3] // 8)

    summary = caching.CacheSummary("latent")
    caching._encode_and_write(Codec(), [(task, loaded)], SDXLFamily(), summary)
    text = tmp_path / "a_sdxl_te.safetensors"
    save_text_cache(text, {"prompt_embeds": torch.zeros(77, 8), "pooled": torch.zeros(4)}, "sdxl", "cap", {})
    batch = CacheDataset([CachedItem("a", task.path, text, task.bucket, 0)], SDXLFamily())[[0]]
    assert batch["cond"].extra["original_size"].tolist() == [[700, 1500]]
    assert batch["cond"].extra["crop_top_left"].tolist() == [[loaded.crop[1], loaded.crop[0]]]


# --- chunk-count batches --------------------------------------------------------------------------------------
def _text_caches(tmp_path, chunks: list[int]):
    import torch

    from flowtuner.data.cache import save_latent_cache, save_text_cache

    for i, n in enumerate(chunks):
        save_latent_cache(tmp_path / f"i{i}_1024x1024_sdxl.safetensors", torch.zeros(4, 1, 128, 128), "sdxl",
                          (1024, 1024), {})
        save_text_cache(tmp_path / f"i{i}_sdxl_te.safetensors", {"prompt_embeds": torch.zeros(77 * n, 8),
                                                                  "pooled": torch.zeros(4)}, "sdxl", "c", {})


def test_batches_are_homogeneous_in_bucket_and_chunk_count(tmp_path):
    from flowtuner.data.loader import BatchPlan, CacheDataset, scan_caches
    from flowtuner.families.sdxl.family import SDXLFamily

    chunks = [1, 2, 3, 1, 2, 1, 1, 3, 2, 2, 1, 3, 1, 2, 1]
    _text_caches(tmp_path, chunks)
    family = SDXLFamily()
    family.batch_group_tensors = ("prompt_embeds",)
    ds = _config(tmp_path, f'cache_directory = "{tmp_path}"\nbatch_size = 2\nbucket_rule = "bigasp"')
    items = scan_caches(ds, family)
    plan = BatchPlan(items, ds, seed=3)
    data = CacheDataset(items, family)
    for epoch in range(3):
        for batch in plan.epoch(epoch):
            assert len({chunks[int(items[i].key[1:])] for i in batch}) == 1
            data[batch]  # SDXL's collate refuses mixed chunk counts: it accepts every planned batch
    assert len(plan) == sum(-(-chunks.count(n) // 2) for n in (1, 2, 3))


def test_without_group_tensors_the_plan_is_unchanged(tmp_path):
    from flowtuner.data.loader import BatchPlan, scan_caches
    from flowtuner.families.sdxl.family import SDXLFamily

    _text_caches(tmp_path, [1, 2, 3, 1])
    family = SDXLFamily()
    family.batch_group_tensors = ()
    ds = _config(tmp_path, f'cache_directory = "{tmp_path}"\nbatch_size = 2\nbucket_rule = "bigasp"')
    items = scan_caches(ds, family)
    assert all(it.group == () for it in items)
    assert list(BatchPlan(items, ds, seed=3).groups) == [(0, (1024, 1024))]


# --- JSONL columns --------------------------------------------------------------------------------------------
def test_jsonl_tags_and_score_columns(tmp_path):
    from flowtuner.data.sources import collect_items

    Image.new("RGB", (64, 64)).save(tmp_path / "a.png")
    lines = [{"image_path": "a.png", "caption": "c", "tags": "x, y", "score": 7},
             {"image_path": "b.png", "caption": "c", "tags": ["x", " y "], "score": 7.0},
             {"image_path": "c.png", "caption": "c", "score": 11},
             {"image_path": "d.png", "caption": "c", "tags": 5}]
    (tmp_path / "m.jsonl").write_text("\n".join(json.dumps(x) for x in lines))
    cfg = tmp_path / "d.toml"
    cfg.write_text(f'[[datasets]]\nimage_jsonl_file = "{tmp_path / "m.jsonl"}"\ncache_directory = "{tmp_path / "c"}"\n')
    from flowtuner.data.config import load_dataset_config

    items, problems = collect_items(load_dataset_config(cfg)[0])
    assert [(i.tags, i.score) for i in items] == [("x, y", 7), ("x, y", 7), (None, None), (None, None)]
    assert [str(p.path.name) for p in problems] == ["c.png", "d.png"]
    assert "'score' 11 must be an integer from 0 to 10 (m.jsonl:3)" in str(problems[0])
    with pytest.raises(P.PromptDataError, match="c.png: no 'tags'"):
        P.recipe_item(items[2])
    assert P.recipe_item(items[0]) == P.RecipeItem("c", "x, y", 7)
