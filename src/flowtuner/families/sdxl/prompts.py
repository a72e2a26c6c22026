"""The bigASP v2.5 prompt builder: one training prompt from an item's caption, tags and score, sized to fill the
item's chunk-count bucket (shared/reference/sdxl-flow-recipe.md §A3; `StreamingImageCaptionDataset.__getitem__`
and `build_prompt_from_tags` of mosaic-train.py@08bc9ba, rule for rule):

- tag prompt with probability 0.2 when the item has tags, else the caption verbatim;
- tag prompt: the tags (a set: duplicates once), plus the quality string of the score with probability 0.9; one
  style for the whole prompt (underscores / spaces / mixed, 50 % per tag); IMPORTANT_TAGS always kept; the other
  tags shuffled and taken while count + tokens(tag) + 1 <= token_limit (the first that does not fit ends the
  list), token_limit = randint((n - 1)·75, n·75), at least 10; the chosen tags shuffled again and joined by ","
  followed by a space 80 % of the time (decided per separator);
- UCG: with probability 0.05 the prompt becomes "" (half) or the bare quality string (half), on either path.

The recipe draws from the process-global RNGs; here every draw comes from one `random.Random` seeded by
(seed, variant, item key), so a prompt is a pure function of those three. Token counts are CLIP-L's without
BOS/EOS, memoised per string, as the recipe counts them."""

from __future__ import annotations

import hashlib
import math
import random
from dataclasses import dataclass

from flowtuner.errors import ConfigError

TAG_PROB = 0.2
QUALITY_PROB = 0.9
UCG_PROB = 0.05
SPACE_AFTER_COMMA_PROB = 0.8
CHUNK_TOKENS = 75
MAX_CHUNKS = 3
MIN_TOKEN_LIMIT = 10
#: room left for a quality tag when a caption's chunk count is measured (the recipe's `+ 5`)
QUALITY_MARGIN = 5
IMPORTANT_TAGS = frozenset({"watermark", "worst quality", "low quality", "normal quality", "high quality",
                            "best quality", "masterpiece quality"})
#: (highest score, quality string), checked in order: the recipe's score_to_quality_string
QUALITY_STRINGS = ((1, "worst quality"), (3, "low quality"), (5, "normal quality"), (6, "high quality"),
                   (8, "best quality"), (10, "masterpiece quality"))
UNDERSCORES, SPACES, MIXED = 0, 1, 2


class PromptDataError(ConfigError):
    """An item whose caption / tags / score the recipe cannot use."""


def quality_string(score: int) -> str:
    """The recipe's quality phrase of a 0..10 score."""
    if isinstance(score, bool) or not isinstance(score, int) or not 0 <= score <= 10:
        raise PromptDataError(f"score {score!r}: must be an integer from 0 to 10.")
    return next(text for top, text in QUALITY_STRINGS if score <= top)


def chunk_count(n_tokens: int) -> int:
    """The chunk-count bucket of a caption of `n_tokens` tokens: clamp(ceil((n + 5) / 75), 1, 3)."""
    return max(1, min(MAX_CHUNKS, math.ceil((n_tokens + QUALITY_MARGIN) / CHUNK_TOKENS)))


@dataclass(frozen=True)
class RecipeItem:
    caption: str
    tags: str  # comma-separated; "" = none
    score: int

    def __post_init__(self):
        quality_string(self.score)


def item_rng(seed: int, variant: int, key: str) -> random.Random:
    """The generator of one prompt: independent of the process, the platform and Python's hash seed."""
    digest = hashlib.sha256(f"{seed}|{variant}|{key}".encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "little"))


class PromptBuilder:
    """Prompts of the recipe for one dataset; `tokenizer` is a Hugging Face CLIP tokenizer (CLIP-L's)."""

    def __init__(self, tokenizer, tag_prob: float = TAG_PROB, ucg_prob: float = UCG_PROB):
        self.tokenizer = tokenizer
        self.tag_prob, self.ucg_prob = tag_prob, ucg_prob
        self._counts: dict[str, int] = {}

    def tokens(self, text: str) -> int:
        if text not in self._counts:
            self._counts[text] = len(self.tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"])
        return self._counts[text]

    def n_chunks(self, item: RecipeItem) -> int:
        """The item's chunk-count bucket, from its caption (from its tags when it has no caption)."""
        return chunk_count(self.tokens(item.caption or item.tags))

    def prompt(self, item: RecipeItem, n_chunks: int, rng: random.Random) -> str:
        """One training prompt (the recipe's caption-or-tags choice, then UCG)."""
        if rng.random() < self.tag_prob and item.tags != "":
            text = self.tag_prompt(item.tags, item.score, n_chunks, rng)
        else:
            text = item.caption
        if rng.random() < self.ucg_prob:
            text = "" if rng.random() < 0.5 else quality_string(item.score)
        return text

    def tag_prompt(self, tag_string: str, score: int, n_chunks: int, rng: random.Random) -> str:
        # sorted: the recipe iterates a set (arbitrary order); sorting makes the draws below reproducible
        tags = sorted({t.strip() for t in tag_string.split(",") if t.strip()})
        quality = quality_string(score)
        if rng.random() < QUALITY_PROB and quality not in tags:
            tags = sorted([*tags, quality])
        style = rng.randint(UNDERSCORES, MIXED)
        important, others = [], []
        for tag in tags:
            styled = tag.replace(" ", "_") if style == UNDERSCORES or (style == MIXED and rng.random() < 0.5) \
                else tag.replace("_", " ")
            (important if tag in IMPORTANT_TAGS else others).append(styled)
        limit = max(MIN_TOKEN_LIMIT, rng.randint((n_chunks - 1) * CHUNK_TOKENS, n_chunks * CHUNK_TOKENS))
        chosen = list(dict.fromkeys(important))
        count = sum(self.tokens(t) for t in chosen)
        rng.shuffle(others)
        for tag in others:
            cost = self.tokens(tag) + 1  # + the comma, as the recipe counts it
            if count + cost > limit:
                break
            chosen.append(tag)
            count += cost
        rng.shuffle(chosen)
        out = ""
        for tag in chosen:
            if out:
                out += ", " if rng.random() < SPACE_AFTER_COMMA_PROB else ","
            out += tag
        return out

    def variants(self, item: RecipeItem, key: str, seed: int, count: int) -> tuple[int, list[str]]:
        """(chunk count, `count` prompts) of one item: variant k drawn from item_rng(seed, k, key)."""
        n = self.n_chunks(item)
        return n, [self.prompt(item, n, item_rng(seed, k, key)) for k in range(count)]


def recipe_item(item) -> RecipeItem:
    """A dataset item (data.sources.Item, read from JSONL) as the recipe reads it; one line naming the file and the
    column when one is missing."""
    for column, value in (("caption", item.caption), ("tags", item.tags), ("score", item.score)):
        if value is None:
            raise PromptDataError(f"{item.image}: no '{column}' (the bigASP prompt recipe reads 'caption', 'tags' and "
                                  f"'score' from each JSONL line; give \"tags\": \"\" for an item without tags).")
    return RecipeItem(item.caption, item.tags, item.score)
