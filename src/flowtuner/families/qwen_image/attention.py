"""`--split_attn` for Qwen-Image: the joint attention run sample by sample, each over its own valid text tokens.

A batch whose prompts differ in length is padded to the longest and masked. Attention backends that ignore
masks (flash, sage, xformers in diffusers' dispatcher) would let padding leak into every token; running each
sample alone over its trimmed text gives the masked result with no mask at all. It also bounds the attention's
working memory to one sample's (a backend that materialises the score matrix holds one sample's at a time).

The processor wraps diffusers' own `QwenDoubleStreamAttnProcessor2_0` rather than re-implementing it: each
sample's image stream and *valid* text tokens, with the text RoPE frequencies of those positions, go through
the stock processor as a batch of one without a mask. The output of the padded text positions is zero (they
carry no information; in the masked batch they attend to the valid tokens but nothing reads them: they are
masked as keys everywhere and the DiT's output is the image stream).
"""

from __future__ import annotations

import torch
from diffusers.models.transformers.transformer_qwenimage import QwenDoubleStreamAttnProcessor2_0


class SplitAttnProcessor(QwenDoubleStreamAttnProcessor2_0):
    """Per-sample joint attention; the attention backend set on the model still applies (same class attributes)."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, encoder_hidden_states_mask=None,
                 attention_mask=None, image_rotary_emb=None):
        call = super().__call__
        if hidden_states.shape[0] == 1 and encoder_hidden_states_mask is None:
            return call(attn, hidden_states, encoder_hidden_states, None, attention_mask, image_rotary_emb)
        imgs, txts = [], []
        length = encoder_hidden_states.shape[1]
        for i in range(hidden_states.shape[0]):
            keep = _valid(encoder_hidden_states_mask, i)
            rope = image_rotary_emb
            if rope is not None and keep is not None:
                rope = (rope[0], rope[1][keep])
            text = encoder_hidden_states[i : i + 1] if keep is None else encoder_hidden_states[i : i + 1, keep]
            img_i, txt_i = call(attn, hidden_states[i : i + 1], text, None, attention_mask, rope)
            imgs.append(img_i)
            txts.append(txt_i if keep is None else _scatter(txt_i, keep, length))
        return torch.cat(imgs), torch.cat(txts)


def _valid(mask: torch.Tensor | None, i: int) -> torch.Tensor | None:
    """Sample i's valid text positions (None: all of them)."""
    if mask is None:
        return None
    keep = mask[i].to(torch.bool)
    return None if bool(keep.all()) else keep.nonzero().squeeze(1)


def _scatter(values: torch.Tensor, keep: torch.Tensor, length: int) -> torch.Tensor:
    """[1, n_valid, D] -> [1, length, D] with zeros at the padded positions (out of place: autograd-safe)."""
    return values.new_zeros(1, length, values.shape[2]).index_copy(1, keep, values)


def split_attention(dit) -> None:
    """Install the per-sample processor on every joint attention of a Qwen-Image DiT (edit models included)."""
    for module in dit.modules():
        if isinstance(getattr(module, "processor", None), QwenDoubleStreamAttnProcessor2_0):
            backend = module.processor._attention_backend
            module.set_processor(SplitAttnProcessor())
            module.processor._attention_backend = backend
