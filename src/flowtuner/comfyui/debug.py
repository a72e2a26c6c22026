"""Debug nodes: statistics of a LATENT or a CONDITIONING, and the difference of two of them.

The debug notes' lessons: random-looking embeddings, a missing mask, reference latents that never arrived, NaNs
after a bad cast are invisible in an image but obvious in numbers. Each node prints its report to ComfyUI's
console, returns it as a STRING (to feed a text node or a file) and shows it on the node (`ui.text`).

Definitions (also in docs/comfyui.md): std is the population std (unbiased=False); a token's norm is the L2 norm
of its embedding; compare's `max abs` = max |a - b|, `max rel` = max |a - b| / max |b| (relative to b's scale:
an element-wise ratio explodes where b is near 0), `rel l2` = ||a - b|| / ||b||, `cosine` = a.b / (||a|| ||b||)
over all elements. NaN / inf are counted and left out of the other figures.
"""

from __future__ import annotations

import logging

import torch

log = logging.getLogger(__name__)

CATEGORY = "flowtuner/debug"
PER_CHANNEL_LIMIT = 64  # more channels than this (a conditioning's width) are summarised, not listed


def _fmt(x: float) -> str:
    return f"{x:.6g}"


def _finite(t: torch.Tensor) -> torch.Tensor:
    t = t.detach().float().cpu()
    return t[torch.isfinite(t)]


def tensor_stats(t: torch.Tensor) -> str:
    """shape, dtype, mean, std, min, max over the finite elements, and the NaN / inf counts."""
    flat = t.detach().float().cpu()
    nan, inf = int(torch.isnan(flat).sum()), int(torch.isinf(flat).sum())
    ok = _finite(flat)
    line = f"shape {list(t.shape)} {str(t.dtype).replace('torch.', '')}"
    if ok.numel():
        line += (f" mean {_fmt(ok.mean().item())} std {_fmt(ok.std(unbiased=False).item())}"
                 f" min {_fmt(ok.min().item())} max {_fmt(ok.max().item())}")
    return line + f" nan {nan} inf {inf}"


def channel_stats(t: torch.Tensor, dim: int = 1) -> list[str]:
    """One line per channel (dim 1 of a latent): mean and std over the finite elements."""
    if t.ndim <= dim or t.shape[dim] > PER_CHANNEL_LIMIT:
        return []
    lines = []
    for c in range(t.shape[dim]):
        ok = _finite(t.select(dim, c))
        lines.append(f"  c{c}: mean {_fmt(ok.mean().item())} std {_fmt(ok.std(unbiased=False).item())}" if ok.numel()
                     else f"  c{c}: no finite values")
    return lines


def latent_report(latent: dict) -> str:
    samples = latent["samples"]
    lines = [f"latent {tensor_stats(samples)}", "per channel:", *channel_stats(samples)]
    for key in sorted(k for k in latent if k != "samples"):
        value = latent[key]
        lines.append(f"{key}: {tensor_stats(value) if isinstance(value, torch.Tensor) else value!r}")
    return "\n".join(lines)


def _describe(value) -> str:
    if isinstance(value, torch.Tensor):
        return tensor_stats(value)
    if isinstance(value, (list, tuple)):
        inner = [_describe(v) for v in value]
        return f"{len(value)} item(s)" + "".join(f"\n    [{i}] {s}" for i, s in enumerate(inner))
    return repr(value) if isinstance(value, (int, float, str, bool, type(None))) else type(value).__name__


def conditioning_report(conditioning: list) -> str:
    lines = [f"conditioning: {len(conditioning)} entr{'y' if len(conditioning) == 1 else 'ies'}"]
    for i, (embeds, extra) in enumerate(conditioning):
        lines.append(f"[{i}] embeds {tensor_stats(embeds)}")
        batch, tokens = embeds.shape[0], embeds.shape[1] if embeds.ndim > 1 else 0
        mask = extra.get("attention_mask")
        valid = [int(m.sum()) for m in mask.reshape(batch, -1)] if isinstance(mask, torch.Tensor) else [tokens] * batch
        lines.append(f"  tokens {tokens} per item, valid {valid}" + ("" if isinstance(mask, torch.Tensor) else " (no attention_mask)"))
        if embeds.ndim == 3 and tokens:
            norms = _finite(embeds.float().norm(dim=-1))
            if norms.numel():
                lines.append(f"  token norms: mean {_fmt(norms.mean().item())} min {_fmt(norms.min().item())} "
                             f"max {_fmt(norms.max().item())}")
        refs = extra.get("reference_latents")
        lines.append(f"  reference_latents: {len(refs) if refs is not None else 0}")
        for key in sorted(extra):
            lines.append(f"  {key}: {_describe(extra[key])}")
    return "\n".join(lines)


def compare_tensors(a: torch.Tensor, b: torch.Tensor) -> str:
    if tuple(a.shape) != tuple(b.shape):
        return f"shapes differ: {list(a.shape)} vs {list(b.shape)}"
    a, b = a.detach().float().cpu().flatten(), b.detach().float().cpu().flatten()
    ok = torch.isfinite(a) & torch.isfinite(b)
    bad = int((~ok).sum())
    a, b = a[ok], b[ok]
    if not a.numel():
        return f"no finite element pairs ({bad} non-finite)"
    diff = (a - b).abs()
    scale, norm_b = b.abs().max().item(), b.norm().item()
    denom = a.norm().item() * norm_b
    rel = diff.max().item() / scale if scale > 0 else float("inf") if diff.max().item() > 0 else 0.0
    rel_l2 = (a - b).norm().item() / norm_b if norm_b > 0 else float("inf") if diff.max().item() > 0 else 0.0
    cos = (a @ b).item() / denom if denom > 0 else float("nan")
    return (f"max abs {_fmt(diff.max().item())} mean abs {_fmt(diff.mean().item())} max rel {_fmt(rel)} "
            f"rel l2 {_fmt(rel_l2)} cosine {_fmt(cos)}" + (f" (non-finite pairs skipped: {bad})" if bad else ""))


def compare_latents(a: dict, b: dict) -> str:
    return f"latent a vs b: {compare_tensors(a['samples'], b['samples'])}"


def compare_conditionings(a: list, b: list) -> str:
    lines = [f"conditioning a vs b: {len(a)} vs {len(b)} entries"]
    for i, ((ea, xa), (eb, xb)) in enumerate(zip(a, b)):
        lines.append(f"[{i}] embeds: {compare_tensors(ea, eb)}")
        ma, mb = xa.get("attention_mask"), xb.get("attention_mask")
        if ma is not None or mb is not None:
            lines.append("  attention_mask: " + (compare_tensors(ma, mb) if ma is not None and mb is not None
                                                 else f"only in {'a' if ma is not None else 'b'}"))
        ra, rb = xa.get("reference_latents") or [], xb.get("reference_latents") or []
        lines.append(f"  reference_latents: {len(ra)} vs {len(rb)}")
        lines += [f"  reference_latents[{j}]: {compare_tensors(x, y)}" for j, (x, y) in enumerate(zip(ra, rb))]
        only = sorted(set(xa) ^ set(xb))
        if only:
            lines.append(f"  keys in one only: {only}")
    return "\n".join(lines)


def _show(text: str) -> dict:
    print(text, flush=True)
    return {"ui": {"text": [text]}, "result": (text,)}


class _DebugNode:
    CATEGORY = CATEGORY
    RETURN_TYPES = ("STRING",)
    RETURN_NAMES = ("text",)
    FUNCTION = "report"
    OUTPUT_NODE = True


class LatentStats(_DebugNode):
    DESCRIPTION = "Shape, mean, std, min, max, NaN / inf counts and per-channel mean / std of a latent."

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"samples": ("LATENT",)}}

    def report(self, samples):
        return _show(latent_report(samples))


class ConditioningStats(_DebugNode):
    DESCRIPTION = ("Per conditioning entry: the embeddings' statistics, tokens (valid ones per the attention mask), "
                   "token norms, reference_latents count and every extra key.")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"conditioning": ("CONDITIONING",)}}

    def report(self, conditioning):
        return _show(conditioning_report(conditioning))


class CompareLatents(_DebugNode):
    DESCRIPTION = "max abs, mean abs, max rel (to max |b|), relative L2 and cosine similarity of two latents."

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"a": ("LATENT",), "b": ("LATENT",)}}

    def report(self, a, b):
        return _show(compare_latents(a, b))


class CompareConditionings(_DebugNode):
    DESCRIPTION = "Embeddings, attention masks and reference latents of two conditionings compared entry by entry."

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"a": ("CONDITIONING",), "b": ("CONDITIONING",)}}

    def report(self, a, b):
        return _show(compare_conditionings(a, b))


def model_report(model=None, text_encoder=None, vae=None) -> str:
    """What the flowtuner loaders resolved, without loading weights: files, version, fp8, LoRAs."""
    lines = []
    if model is not None:
        from flowtuner.families.qwen_image.dit import inspect_dit
        from flowtuner.weights.reader import open_checkpoint

        info = inspect_dit(open_checkpoint(model.paths.dit))
        blocks = info.config.get("num_layers")
        lines.append(f"model: {model.paths.dit} version {model.version} ({type(model.family).__name__}) "
                     f"stored {str(info.dtype).replace('torch.', '')} blocks {blocks} fp8 {model.fp8} "
                     f"fp8_scaled {model.fp8_scaled}")
        lines += [f"  lora {file} x{multiplier}" for file, multiplier in model.loras]
    if text_encoder is not None:
        lines.append(f"text encoder: {text_encoder.paths.text_encoder}")
    if vae is not None:
        codec = getattr(vae, "codec", None)
        lines.append(f"vae: {getattr(vae, 'source', None) or type(vae).__name__}"
                     + (f" (flowtuner, z_dim {codec.vae.config.z_dim})" if codec is not None else " (ComfyUI's own)"))
    return "\n".join(lines) or "nothing connected"


class ModelInfo(_DebugNode):
    DESCRIPTION = "What flowtuner's loaders resolved (files, model version, stored dtype, fp8, LoRAs), no weights loaded."

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {}, "optional": {"model": ("FLOWTUNER_MODEL",), "text_encoder": ("FLOWTUNER_TEXT_ENCODER",),
                                             "vae": ("VAE",)}}

    def report(self, model=None, text_encoder=None, vae=None):
        from flowtuner.comfyui.loaders import node_errors

        return _show(node_errors(model_report)(model, text_encoder, vae))


NODES = {
    "flowtunerModelInfo": ModelInfo,
    "flowtunerLatentStats": LatentStats,
    "flowtunerConditioningStats": ConditioningStats,
    "flowtunerCompareLatents": CompareLatents,
    "flowtunerCompareConditionings": CompareConditionings,
}
DISPLAY = {
    "flowtunerModelInfo": "flowtuner model info",
    "flowtunerLatentStats": "flowtuner latent statistics",
    "flowtunerConditioningStats": "flowtuner conditioning statistics",
    "flowtunerCompareLatents": "flowtuner compare latents",
    "flowtunerCompareConditionings": "flowtuner compare conditionings",
}
