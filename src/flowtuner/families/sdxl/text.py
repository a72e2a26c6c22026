"""SDXL text conditioning: CLIP-L + OpenCLIP-bigG, prompts in 75-token chunks, ComfyUI's prompt weighting.

A prompt is split into chunks of at most 75 tokens, each sent as [BOS] + tokens + [EOS] + pad to 77, the way
ComfyUI (and NovelAI before it) reads long prompts; diffusers instead truncates at 77. Chunks are cut as ComfyUI
cuts them: a weighted segment (prompt_weights.py) of fewer than 8 tokens moves whole to the next chunk rather
than being split; a longer one is split at the 75-token boundary. An unweighted prompt is therefore cut every
75 tokens exactly (the bigASP recipe's rule). At most `max_chunks` (3, NovelAI's and the recipe's limit)
are kept; tokens beyond are dropped with a warning (ComfyUI keeps any number).

Each chunk goes through both encoders; the hidden states of their penultimate layer (no final layer norm)
are concatenated to 768 + 1280 = 2048 features per token and the chunks joined along the sequence (77·k
tokens). The pooled vector is bigG's text projection at the end token of the first chunk (ComfyUI's rule).
A weighted token's features are moved away from the empty prompt's features at the same position:
z = (z - z_empty)·w + z_empty (ComfyUI's ClipTokenWeightEncoder)."""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass

import torch

from flowtuner.errors import ConfigError
from flowtuner.families.base import Conditioning, TextEncoder
from flowtuner.families.sdxl.prompt_weights import parse_weights

log = logging.getLogger(__name__)

CHUNK_TOKENS = 75
CONTEXT = CHUNK_TOKENS + 2
MAX_CHUNKS = 3
# a weighted segment this long or longer may be split across chunks; shorter ones move whole (ComfyUI's max_word_length)
SPLITTABLE_SEGMENT = 8
START_ID, END_ID = 49406, 49407
# each encoder's padding after the end token: CLIP-L pads with the end token, OpenCLIP-bigG with id 0 ("!")
PAD_IDS = {"clip_l": END_ID, "clip_g": 0}
EMBEDDING_PREFIX = "embedding:"
_EMBEDDING_SPLIT = re.compile(f" {EMBEDDING_PREFIX}|\n{EMBEDDING_PREFIX}")


@dataclass
class PromptTokens:
    """A prompt's chunks: per chunk its content tokens (no BOS/EOS/pad) with their weights."""

    chunks: list[list[tuple[int, float]]]
    dropped_tokens: int = 0

    @property
    def weighted(self) -> bool:
        return any(w != 1.0 for chunk in self.chunks for _, w in chunk)

    def ids(self, pad: int) -> torch.Tensor:
        """[chunks, 77] token ids, padded with `pad` after each chunk's end token."""
        rows = [[START_ID] + [t for t, _ in c] + [END_ID] + [pad] * (CHUNK_TOKENS - len(c)) for c in self.chunks]
        return torch.tensor(rows, dtype=torch.long)

    def weights(self) -> torch.Tensor:
        """[chunks, 77] weight of every position (1 for BOS, EOS and padding)."""
        rows = [[1.0] + [w for _, w in c] + [1.0] * (CONTEXT - 1 - len(c)) for c in self.chunks]
        return torch.tensor(rows, dtype=torch.float32)


def empty_chunk() -> list[tuple[int, float]]:
    return []


class PromptTokenizer:
    """Prompt -> PromptTokens with one CLIP tokenizer (both encoders share the vocabulary; pads differ)."""

    def __init__(self, tokenizer, max_chunks: int | None = MAX_CHUNKS, weighted: bool = True):
        if max_chunks is not None and max_chunks < 1:
            raise ConfigError(f"max_chunks {max_chunks}: must be at least 1 (or None for no limit).")
        self.tokenizer = tokenizer
        self.max_chunks = max_chunks
        self.weighted = weighted

    def _words(self, text: str) -> list[str]:
        """ComfyUI tokenizes `embedding:NAME` apart from the text before it; textual-inversion embeddings are
        not loaded here, so the name is read as text (as ComfyUI does without an embeddings folder)."""
        parts = _EMBEDDING_SPLIT.split(text)
        words = [parts[0]] + [EMBEDDING_PREFIX + p for p in parts[1:]]
        if any(w.startswith(EMBEDDING_PREFIX) for w in words):
            log.warning("prompt uses %s...: textual-inversion embeddings are not supported; the name is encoded as "
                        "plain text.", EMBEDDING_PREFIX)
        return [w for w in words if w]

    def _segments(self, prompt: str) -> list[list[tuple[int, float]]]:
        """The prompt's token groups: one per weighted segment (and per embedding word), with weights."""
        groups = []
        for text, weight in parse_weights(prompt, self.weighted):
            for word in self._words(text):
                ids = self.tokenizer(word, add_special_tokens=False, verbose=False)["input_ids"]
                groups.append([(t, weight) for t in ids])
        return groups

    @staticmethod
    def _chunk(groups: list[list[tuple[int, float]]]) -> list[list[tuple[int, float]]]:
        chunks: list[list[tuple[int, float]]] = [empty_chunk()]
        for group in groups:
            splittable = len(group) >= SPLITTABLE_SEGMENT
            while group:
                room = CHUNK_TOKENS - len(chunks[-1])
                if len(group) <= room:
                    chunks[-1].extend(group)
                    break
                if splittable:
                    chunks[-1].extend(group[:room])
                    group = group[room:]
                chunks.append(empty_chunk())
        return chunks

    def all_chunks(self, prompt: str) -> list[list[tuple[int, float]]]:
        """Every chunk of the prompt, none dropped."""
        return self._chunk(self._segments(prompt))

    def tokenize(self, prompt: str, chunks: int | None = None) -> PromptTokens:
        """The prompt's chunks. `chunks` fixes their number (a chunk-count bucket): padded with empty chunks
        ([BOS][EOS][pad...]), or cut with a warning; else up to `max_chunks`."""
        found = self.all_chunks(prompt)
        limit = chunks if chunks is not None else self.max_chunks
        if chunks is not None and chunks < 1:
            raise ConfigError(f"chunks {chunks}: a prompt has at least 1 chunk of {CHUNK_TOKENS} tokens.")
        kept, dropped = (found, []) if limit is None else (found[:limit], found[limit:])
        lost = sum(len(c) for c in dropped)
        if lost:
            log.warning("prompt longer than %d chunks of %d tokens: %d tokens dropped (%r...).",
                        limit, CHUNK_TOKENS, lost, prompt[:60])
        if chunks is not None:
            kept += [empty_chunk() for _ in range(chunks - len(kept))]
        return PromptTokens(kept, lost)

    def chunk_count(self, prompt: str) -> int:
        """How many chunks the prompt fills (1..max_chunks): its chunk-count bucket."""
        count = len(self.all_chunks(prompt))
        return count if self.max_chunks is None else min(count, self.max_chunks)


def _penultimate(model, ids: torch.Tensor):
    device = next(model.parameters()).device
    out = model(input_ids=ids.to(device), output_hidden_states=True)
    return out.hidden_states[-2].float(), out


def apply_weights(z: torch.Tensor, weights: torch.Tensor, z_empty: torch.Tensor) -> torch.Tensor:
    """ComfyUI's weighting: z [chunks, 77, D], weights [chunks, 77], z_empty [77, D] (the empty prompt)."""
    w = weights.to(z.device)[..., None]
    return torch.where(w != 1.0, (z - z_empty) * w + z_empty, z)


class SdxlTextEncoder(TextEncoder):
    """Both CLIP encoders and the prompt tokenizer: encode(prompts) -> one Conditioning per prompt, embeds
    [1, 77·chunks, 2048] (float32, CPU) and extra["pooled"] [1, 1280]."""

    def __init__(self, clip_l, clip_g, tokenizer, max_chunks: int | None = MAX_CHUNKS, weighted: bool = True):
        self.clip_l = clip_l
        self.clip_g = clip_g
        self.tokens = PromptTokenizer(tokenizer, max_chunks, weighted)

    def chunk_count(self, prompt: str) -> int:
        return self.tokens.chunk_count(prompt)

    @torch.no_grad()
    def _encoder(self, model, name: str, tokens: PromptTokens) -> tuple[torch.Tensor, object]:
        """[chunks, 77, D] penultimate states of one encoder, weighted, and its raw output."""
        ids = tokens.ids(PAD_IDS[name])
        if not tokens.weighted:
            return _penultimate(model, ids)
        empty = PromptTokens([empty_chunk()]).ids(PAD_IDS[name])
        z, out = _penultimate(model, torch.cat([ids, empty]))
        return apply_weights(z[:-1], tokens.weights(), z[-1]), out

    def encode_tokens(self, tokens: PromptTokens) -> Conditioning:
        z_l, _ = self._encoder(self.clip_l, "clip_l", tokens)
        z_g, out_g = self._encoder(self.clip_g, "clip_g", tokens)
        embeds = torch.cat([z_l, z_g], dim=-1).reshape(1, -1, z_l.shape[-1] + z_g.shape[-1])
        pooled = out_g.text_embeds[0:1].float()
        return Conditioning(embeds.cpu(), extra={"pooled": pooled.cpu()})

    def encode(self, prompts: list[str], images=None, sizes=None, chunks: int | None = None) -> list[Conditioning]:
        """One Conditioning per prompt; `chunks` fixes every prompt's chunk count (cached training buckets)."""
        if images and any(images):
            raise ConfigError("SDXL reads text only: drop --control_image_path / --ci.")
        return [self.encode_tokens(self.tokens.tokenize(p, chunks)) for p in prompts]
