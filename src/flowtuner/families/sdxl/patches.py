"""UNet-only patches on diffusers' UNet2DConditionModel, as ComfyUI's nodes apply them to its own UNet
(../shared/reference/guidance-and-sampling.md §3.2, §3.9, §3.10):

- PAG: identity self-attention (attn1 returns its to_v projection, then to_out) in chosen transformer blocks.
- SAG: the mid block's first attn1 computed explicitly, its attention probabilities recorded (§3.9).
- FreeU / FreeU_V2: before each up-block resnet, the backbone features h get half their channels scaled and the
  skip features a Fourier filter, keyed by h's channel count (4 x / 2 x model_channels).

Block names follow ComfyUI's attn1 patch keys, which count ldm's input_blocks / output_blocks: `middle` (= middle.0,
every transformer block of the mid block, ComfyUI's PAG default), `input.ID`, `output.ID`, with an optional
transformer index (`output.1.0`), several joined by '+'. For SDXL: input.4, 5, 7, 8; middle.0; output.0-5.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch

from flowtuner.errors import ConfigError


# ---------------------------------------------------------------------------------------------------- block names
def attention_sites(unet) -> dict[str, torch.nn.Module]:
    """ComfyUI's (block, id) names -> the Transformer2DModel there. ldm numbers input_blocks from conv_in (0), each
    down block taking layers_per_block ids plus one for its downsampler; output_blocks layers_per_block + 1 per up
    block; the mid block is middle.0."""
    sites: dict[str, torch.nn.Module] = {}
    next_id = 1
    for block in unet.down_blocks:
        for j, resnet in enumerate(block.resnets):
            if getattr(block, "attentions", None) is not None and j < len(block.attentions):
                sites[f"input.{next_id}"] = block.attentions[j]
            next_id += 1
        next_id += 1 if getattr(block, "downsamplers", None) else 0
    if getattr(unet.mid_block, "attentions", None):
        sites["middle.0"] = unet.mid_block.attentions[0]
    next_id = 0
    for block in unet.up_blocks:
        for j, resnet in enumerate(block.resnets):
            if getattr(block, "attentions", None) is not None and j < len(block.attentions):
                sites[f"output.{next_id}"] = block.attentions[j]
            next_id += 1
    return sites


def parse_blocks(spec: str, unet, method: str = "pag") -> list[torch.nn.Module]:
    """'middle' | 'input.ID' | 'output.ID' | 'NAME.ID.INDEX', joined by '+' -> the BasicTransformerBlocks named."""
    sites = attention_sites(unet)
    out: list[torch.nn.Module] = []
    for part in (p.strip() for p in str(spec).split("+")):
        name, index = _site(part)
        if name not in sites:
            raise ConfigError(f"--guidance {method}: blocks={spec!r}: no attention block {name!r}; this UNet has "
                              f"{', '.join(sites)} (optionally .INDEX of a transformer block), joined by '+'.")
        blocks = list(sites[name].transformer_blocks)
        if index is not None:
            if not index.isdigit() or int(index) >= len(blocks):
                raise ConfigError(f"--guidance {method}: blocks={spec!r}: {name} has transformer blocks 0-{len(blocks) - 1}.")
            blocks = [blocks[int(index)]]
        out += [b for b in blocks if b not in out]
    return out


def _site(part: str) -> tuple[str, str | None]:
    """'middle' -> ('middle.0', None); 'output.1.0' -> ('output.1', '0'); 'output.1' -> ('output.1', None)."""
    pieces = part.split(".")
    if pieces == ["middle"]:
        return "middle.0", None
    if len(pieces) > 3:
        return part, None  # no such block: the caller's error names the valid ones
    return ".".join(pieces[:2]), (pieces[2] if len(pieces) == 3 else None)


# ---------------------------------------------------------------------------------------------------- PAG
class IdentityAttention:
    """An attention processor whose attention map is the identity: each token keeps its own value, to_v then to_out
    (ComfyUI's PAG replacement returns v)."""

    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states=None, attention_mask=None, temb=None,
                 *args, **kwargs) -> torch.Tensor:
        out = attn.to_out[1](attn.to_out[0](attn.to_v(hidden_states)))
        if attn.residual_connection:
            out = out + hidden_states
        return out / attn.rescale_output_factor


@contextmanager
def processors(blocks: list[torch.nn.Module], make: Callable[[], object]) -> Iterator[None]:
    """Within the context, the attn1 of each block runs `make()`'s processor; the old ones come back after."""
    saved = [b.attn1.processor for b in blocks]
    try:
        for b in blocks:
            b.attn1.set_processor(make())
        yield
    finally:
        for b, processor in zip(blocks, saved):
            b.attn1.set_processor(processor)


def identity_self_attention(unet, spec: str):
    return processors(parse_blocks(spec, unet), IdentityAttention)


# ---------------------------------------------------------------------------------------------------- SAG
#: where SAG reads self-attention: ComfyUI's attn1 key ("middle", 0, 0), the mid block's first transformer block
SAG_SITE = "middle.0.0"


class RecordingAttention:
    """Self-attention computed explicitly, softmax(q k^T / sqrt(d)) v, its probabilities [B x heads, n, n] appended to
    `into`. The scores are float32 where the block upcasts attention (diffusers' upcast_attention, ComfyUI's
    attn_precision float32), else in the model's dtype, as ComfyUI's SAG computes them."""

    def __init__(self, into: list):
        self.into = into

    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states=None, attention_mask=None, temb=None,
                 *args, **kwargs) -> torch.Tensor:
        b, n, _ = hidden_states.shape
        q, k, v = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
        d = q.shape[-1] // attn.heads
        q, k, v = ((t.reshape(b, n, attn.heads, d).permute(0, 2, 1, 3).reshape(b * attn.heads, n, d)) for t in (q, k, v))
        if attn.upcast_attention:
            q, k = q.float(), k.float()
        probs = (torch.bmm(q, k.transpose(1, 2)) * d**-0.5).softmax(dim=-1)
        self.into.append(probs)
        out = torch.bmm(probs.to(v.dtype), v).reshape(b, attn.heads, n, d).permute(0, 2, 1, 3).reshape(b, n, attn.heads * d)
        out = attn.to_out[1](attn.to_out[0](out))
        if attn.residual_connection:
            out = out + hidden_states
        return out / attn.rescale_output_factor


@contextmanager
def recorded_self_attention(unet) -> Iterator[list]:
    """Within the context, the SAG site's attention probabilities of every UNet call land in the yielded list."""
    recorded: list[torch.Tensor] = []
    with processors(parse_blocks(SAG_SITE, unet, "sag"), lambda: RecordingAttention(recorded)):
        yield recorded


# ---------------------------------------------------------------------------------------------------- FreeU
def fourier_filter(x: torch.Tensor, scale: float, threshold: int = 1) -> torch.Tensor:
    """The centre 2 threshold x 2 threshold block of the shifted 2-D spectrum x scale, in float32."""
    spec = torch.fft.fftshift(torch.fft.fftn(x.float(), dim=(-2, -1)), dim=(-2, -1))
    h, w = spec.shape[-2:]
    mask = torch.ones(spec.shape[-2:], device=x.device)
    mask[h // 2 - threshold:h // 2 + threshold, w // 2 - threshold:w // 2 + threshold] = scale
    spec = torch.fft.ifftshift(spec * mask, dim=(-2, -1))
    return torch.fft.ifftn(spec, dim=(-2, -1)).real.to(x.dtype)


def _freeu_backbone(h: torch.Tensor, b: float) -> torch.Tensor:
    half = h.shape[1] // 2
    return torch.cat([h[:, :half] * b, h[:, half:]], dim=1)


def _freeu_v2_backbone(h: torch.Tensor, b: float) -> torch.Tensor:
    """The scale follows the channel-mean map, min-max normalised per sample: 1 at its minimum, b at its maximum."""
    mean = h.mean(1, keepdim=True)
    flat = mean.flatten(1)
    lo, hi = flat.min(1).values.view(-1, 1, 1, 1), flat.max(1).values.view(-1, 1, 1, 1)
    half = h.shape[1] // 2
    return torch.cat([h[:, :half] * ((b - 1) * (mean - lo) / (hi - lo) + 1), h[:, half:]], dim=1)


#: FreeU variant -> how the backbone half is scaled (the skip filter is the same)
FREEU_BACKBONES: dict[str, Callable[[torch.Tensor, float], torch.Tensor]] = {"freeu": _freeu_backbone,
                                                                             "freeu_v2": _freeu_v2_backbone}


def skip_splits(unet) -> list[tuple[torch.nn.Module, int]]:
    """(up-block resnet, channels of the backbone h in its concatenated input [h, skip]): h is what the previous
    resnet on the up path (the mid block's last, first) put out."""
    out, previous = [], unet.mid_block.resnets[-1].out_channels
    for block in unet.up_blocks:
        for resnet in block.resnets:
            out.append((resnet, previous))
            previous = resnet.out_channels
    return out


@contextmanager
def freeu(unet, variant: str, params: dict) -> Iterator[None]:
    """ComfyUI's FreeU / FreeU_V2 output-block patch. diffusers' own `enable_freeu` differs (so it is not used): it
    picks the stage by up-block index, not h's channel count, so the first resnet of up block 1 (h at 4 x
    model_channels) gets b2/s2 instead of b1/s1 and that of up block 2 (2 x) none; and it has no V2."""
    channels = unet.config.block_out_channels[0]
    scales = {4 * channels: (params["b1"], params["s1"]), 2 * channels: (params["b2"], params["s2"])}
    backbone = FREEU_BACKBONES[variant]

    def hook(split: int, scale: tuple[float, float]):
        def pre(module, args, kwargs):
            x = args[0]
            h, skip = backbone(x[:, :split], scale[0]), fourier_filter(x[:, split:], scale[1])
            return (torch.cat([h, skip], dim=1), *args[1:]), kwargs

        return pre

    handles = [resnet.register_forward_pre_hook(hook(split, scales[split]), with_kwargs=True)
               for resnet, split in skip_splits(unet) if split in scales]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


#: --guidance methods of stage "model" -> the context that patches the UNet
MODEL_PATCHES: dict[str, Callable] = {name: (lambda unet, params, name=name: freeu(unet, name, params)) for name in FREEU_BACKBONES}
