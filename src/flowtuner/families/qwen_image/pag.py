"""Perturbed-attention guidance for the Qwen-Image DiT.

PAG (Ahn et al.) degrades a pass by replacing self-attention maps with the identity, each token keeping
only its own value. ComfyUI patches a UNet's middle-block attn1 for this; on Qwen's double-stream DiT
that patch never fires. Here the joint attention of the chosen blocks is replaced as follows:
- image queries attend to all text keys and, among the image keys, only to themselves (the image
  self-attention map becomes the identity; the image-text part, Qwen's cross-attention, is kept — as
  diffusers' PAG does for SD3's joint attention);
- text queries attend as usual.
Computed without a dense (text + image)^2 mask: image rows need only their text logits and one self
logit, O(image x text) memory.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from diffusers.models.transformers.transformer_qwenimage import apply_rotary_emb_qwen

from flowtuner.errors import ConfigError


def parse_blocks(spec: str, count: int) -> list[int]:
    """'middle' | 'N' | 'A-B', several joined by '+': '5+20-23'."""
    out: list[int] = []
    for part in str(spec).split("+"):
        part = part.strip()
        try:
            if part == "middle":
                out.append(count // 2)
            elif "-" in part:
                lo, hi = (int(v) for v in part.split("-", 1))
                out.extend(range(lo, hi + 1))
            else:
                out.append(int(float(part)))
        except ValueError:
            raise ConfigError(f"--guidance pag: blocks={spec!r}: use 'middle', N, A-B, joined by '+' (e.g. 20-23).") from None
    bad = [b for b in out if not 0 <= b < count]
    if bad or not out:
        raise ConfigError(f"--guidance pag: blocks={spec!r}: this DiT has blocks 0-{count - 1}.")
    return sorted(set(out))


class IdentitySelfAttention:
    """A QwenDoubleStreamAttnProcessor2_0 whose image self-attention map is the identity."""

    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor,
                 encoder_hidden_states_mask: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                 image_rotary_emb=None) -> tuple[torch.Tensor, torch.Tensor]:
        head_dim = attn.inner_dim // attn.heads
        heads = lambda t: t.unflatten(-1, (-1, head_dim))  # noqa: E731  [B, L, H, D]
        q_i, k_i, v_i = heads(attn.to_q(hidden_states)), heads(attn.to_k(hidden_states)), heads(attn.to_v(hidden_states))
        q_t, k_t = heads(attn.add_q_proj(encoder_hidden_states)), heads(attn.add_k_proj(encoder_hidden_states))
        v_t = heads(attn.add_v_proj(encoder_hidden_states))
        norm = lambda layer, t: t if layer is None else layer(t)  # noqa: E731
        q_i, k_i = norm(attn.norm_q, q_i), norm(attn.norm_k, k_i)
        q_t, k_t = norm(attn.norm_added_q, q_t), norm(attn.norm_added_k, k_t)
        if image_rotary_emb is not None:
            img_freqs, txt_freqs = image_rotary_emb
            q_i, k_i = (apply_rotary_emb_qwen(t, img_freqs, use_real=False) for t in (q_i, k_i))
            q_t, k_t = (apply_rotary_emb_qwen(t, txt_freqs, use_real=False) for t in (q_t, k_t))
        q_i, k_i, v_i, q_t, k_t, v_t = (t.transpose(1, 2) for t in (q_i, k_i, v_i, q_t, k_t, v_t))  # [B, H, L, D]

        text_ok = None if encoder_hidden_states_mask is None else encoder_hidden_states_mask.bool()[:, None, None, :]
        # text rows: ordinary joint attention over [text, image] keys
        key_ok = None
        if text_ok is not None:
            image_ok = torch.ones(text_ok.shape[:-1] + (k_i.shape[2],), dtype=torch.bool, device=text_ok.device)
            key_ok = torch.cat([text_ok, image_ok], dim=-1)
        txt_out = torch.nn.functional.scaled_dot_product_attention(
            q_t, torch.cat([k_t, k_i], dim=2), torch.cat([v_t, v_i], dim=2), attn_mask=key_ok)
        # image rows: softmax over [text keys, own key]
        scale = head_dim**-0.5
        logits_t = (q_i @ k_t.transpose(-1, -2)).float() * scale
        if text_ok is not None:
            logits_t = logits_t.masked_fill(~text_ok, float("-inf"))
        logit_self = (q_i * k_i).sum(-1, keepdim=True).float() * scale
        probs = torch.softmax(torch.cat([logits_t, logit_self], dim=-1), dim=-1)
        img_out = (probs[..., :-1].to(v_t.dtype) @ v_t) + probs[..., -1:].to(v_i.dtype) * v_i

        img_out = img_out.transpose(1, 2).flatten(2, 3).to(hidden_states.dtype)
        txt_out = txt_out.transpose(1, 2).flatten(2, 3).to(encoder_hidden_states.dtype)
        img_out = attn.to_out[0](img_out.contiguous())
        if len(attn.to_out) > 1:
            img_out = attn.to_out[1](img_out)
        return img_out, attn.to_add_out(txt_out.contiguous())


@contextmanager
def identity_self_attention(dit, spec: str) -> Iterator[None]:
    """Within the context, the chosen blocks of `dit` use IdentitySelfAttention."""
    blocks = [dit.transformer_blocks[i] for i in parse_blocks(spec, len(dit.transformer_blocks))]
    saved = [b.attn.processor for b in blocks]
    try:
        for b in blocks:
            b.attn.set_processor(IdentitySelfAttention())
        yield
    finally:
        for b, processor in zip(blocks, saved):
            b.attn.set_processor(processor)
