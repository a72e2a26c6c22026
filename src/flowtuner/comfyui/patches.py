"""MODEL -> MODEL patches for ComfyUI's own Qwen-Image DiT (comfy/ldm/qwen_image/model.py), which ComfyUI's
UNet-only patches never reach.

PAG. ComfyUI's PerturbedAttentionGuidance replaces `attn1` of the UNet's middle block; the Qwen DiT has no
such block and never reads `patches_replace["attn1"]`, so on Qwen that node changes nothing. Here the
perturbed pass follows flowtuner's semantics (families/qwen_image/pag.py): in the chosen blocks, image queries
attend to all text keys and, among image keys, only to themselves; text queries attend as usual. ComfyUI's
post-CFG formula is kept: D_out = D_cfg + scale (D_c - D_pag).

Hook points, both public parts of ComfyUI's patcher API (no ComfyUI file is touched):
- `transformer_options["patches_replace"]["dit"][("double_block", i)]`, which the Qwen DiT consults for
  every block i; the replacement runs the original block with a copy of transformer_options that carries
- `optimized_attention_override`, which every ComfyUI attention function (wrap_attn) hands the call to; the
  Qwen block calls attention once, on the joint [text, image] sequence, so the override sees q/k/v of the
  block and the text length is known from the block's inputs.
The override is set only inside the perturbed pass that the post-CFG function runs, so the ordinary
cond/uncond passes are untouched.
"""

from __future__ import annotations

import functools

import torch

from flowtuner.errors import ConfigError
from flowtuner.families.qwen_image.pag import parse_blocks

PAG_NAME = "flowtuner PAG (Qwen DiT)"


def identity_image_attention(func, q, k, v, heads, mask=None, *args, txt_len: int, **kwargs) -> torch.Tensor:
    """An `optimized_attention_override` for one Qwen block: the joint attention of ComfyUI's Qwen DiT
    (q, k, v: [B, text + image, heads x dim]) with the image self-attention map replaced by the identity."""
    if mask is not None or kwargs.get("skip_reshape") or kwargs.get("skip_output_reshape"):
        raise ConfigError(f"{PAG_NAME}: this ComfyUI calls the Qwen DiT's attention with a mask or another layout, "
                          "which the patch does not handle; update flowtuner or report the ComfyUI version.")
    # text rows: ordinary attention over all keys, by ComfyUI's own backend (func is the unwrapped function)
    txt_out = func(q[:, :txt_len], k, v, heads, None, *args, **kwargs)
    b, _, inner = q.shape
    split = lambda t: t.unflatten(-1, (heads, inner // heads)).transpose(1, 2).float()  # noqa: E731  [B, H, L, D]
    q_i, k_i, v_i = split(q[:, txt_len:]), split(k[:, txt_len:]), split(v[:, txt_len:])
    k_t, v_t = split(k[:, :txt_len]), split(v[:, :txt_len])
    scale = (inner // heads) ** -0.5
    # image rows: softmax over [text keys, own key], O(image x text) memory
    logits = torch.cat([q_i @ k_t.transpose(-1, -2), (q_i * k_i).sum(-1, keepdim=True)], dim=-1) * scale
    probs = torch.softmax(logits, dim=-1)
    img_out = probs[..., :-1] @ v_t + probs[..., -1:] * v_i
    img_out = img_out.transpose(1, 2).reshape(b, -1, inner).to(txt_out.dtype)
    return torch.cat([txt_out, img_out], dim=1)


def _perturbed_block(previous, args: dict, extra: dict) -> dict:
    """A `patches_replace["dit"]` entry: the block (or the replacement another node installed before) run with
    the identity image self-attention."""
    options = dict(args["transformer_options"])
    options["optimized_attention_override"] = functools.partial(identity_image_attention, txt_len=args["txt"].shape[1])
    args = {**args, "transformer_options": options}
    return previous(args, extra) if previous is not None else extra["original_block"](args)


def perturbed_options(model_options: dict, blocks: list[int]) -> dict:
    """A copy of ComfyUI's model_options whose Qwen DiT runs `blocks` with identity image self-attention."""
    import comfy.model_patcher

    options = dict(model_options)
    for i in blocks:
        previous = options.get("transformer_options", {}).get("patches_replace", {}).get("dit", {}).get(("double_block", i))
        options = comfy.model_patcher.set_model_options_patch_replace(
            options, functools.partial(_perturbed_block, previous), "dit", "double_block", i)
    return options


def qwen_blocks(model) -> int:
    """The block count of the Qwen-Image DiT inside a ComfyUI MODEL; a one-line error for any other model."""
    dit = model.get_model_object("diffusion_model")
    blocks = getattr(dit, "transformer_blocks", None)
    if blocks is None or not all(hasattr(b, "attn") and hasattr(b.attn, "add_q_proj") for b in blocks):
        raise ConfigError(f"{PAG_NAME}: the MODEL is {type(dit).__name__}, not a Qwen-Image DiT; connect a Qwen-Image "
                          "or Qwen-Image-Edit model (for UNet models use ComfyUI's PerturbedAttentionGuidance).")
    return len(blocks)


def pag_post_cfg(scale: float, blocks: list[int]):
    """ComfyUI's post-CFG function for PAG: one extra conditional pass with the perturbed blocks."""
    import comfy.samplers

    def post_cfg(args: dict) -> torch.Tensor:
        if scale == 0:
            return args["denoised"]
        options = perturbed_options(args["model_options"], blocks)
        (d_pag,) = comfy.samplers.calc_cond_batch(args["model"], [args["cond"]], args["input"], args["sigma"], options)
        return args["denoised"] + (args["cond_denoised"] - d_pag) * scale

    return post_cfg


class QwenPAG:
    """Perturbed-attention guidance on the Qwen DiT's image self-attention (ComfyUI's MODEL in and out)."""

    CATEGORY = "flowtuner/patches"
    RETURN_TYPES = ("MODEL",)
    FUNCTION = "patch"
    DESCRIPTION = ("PAG for Qwen-Image's DiT: one extra conditional pass per step in which the chosen blocks' image "
                   "tokens see all text tokens but, among image tokens, only themselves; D = D_cfg + scale (D_c - D_pag). "
                   "ComfyUI's PerturbedAttentionGuidance patches a UNet block and does nothing on this DiT.")

    @classmethod
    def INPUT_TYPES(cls):  # noqa: N802 - ComfyUI's name
        return {"required": {
            "model": ("MODEL",),
            "scale": ("FLOAT", {"default": 3.0, "min": 0.0, "max": 100.0, "step": 0.01, "round": 0.01,
                                "tooltip": "PAG strength; lower the CFG by about as much (PAG + CFG ~ the CFG you used)"}),
            "blocks": ("STRING", {"default": "middle",
                                  "tooltip": "perturbed blocks: 'middle', N, A-B, joined by '+' (e.g. 20-23 of 0-59)"}),
        }}

    def patch(self, model, scale: float, blocks: str):
        count = qwen_blocks(model)
        try:
            chosen = parse_blocks(blocks, count)
        except ConfigError:
            raise ConfigError(f"{PAG_NAME}: blocks={blocks!r}: use 'middle', N, A-B, joined by '+'; "
                              f"this DiT has blocks 0-{count - 1}.") from None
        patched = model.clone()
        patched.set_model_sampler_post_cfg_function(pag_post_cfg(float(scale), chosen))
        return (patched,)


NODES: dict[str, type] = {"flowtunerQwenPAG": QwenPAG}
DISPLAY: dict[str, str] = {"flowtunerQwenPAG": PAG_NAME}
