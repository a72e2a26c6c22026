"""`--fp8_scaled`: which scale granularity, by measured error against bf16 (docs/memory.md "fp8 scaled").

(a) Real-width Qwen-Image Linears: img_mlp.net.0.proj (3072 -> 12288), attn.to_q (3072 -> 3072) and img_mod.1
    (3072 -> 18432). Real weights are not available here, so each weight is drawn heavy-tailed: Student-t with
    5 degrees of freedom (kurtosis 9: trained transformer weights are peaked with outliers, which is what makes
    a shared scale costly), std 0.02 (~1/sqrt(3072), the order of trained DiT weights), times a log-normal gain
    per output row and per input column (sigma 0.3; trained layers have uneven channel norms). The input is 1024
    tokens x 3072 of unit Gaussian with 8 "massive activation" channels x 20 (DiT / LLM hidden states carry a few
    such channels), SiLU of a Gaussian for img_mod.1 (its input is SiLU(temb)). Error of x @ deq(W)^T against
    x @ W_bf16^T (float32 matmuls): ||a - b|| / ||a|| and max |a - b| / max |a|.
(b) The loud tiny DiT (bench/fp8_base.py's: 4 blocks, QK-norm gains and modulation x3) in bf16: one call at
    sigma 0.5 and the latents of an 8-step Euler run, each scaled granularity against the bf16 model.

    OMP_NUM_THREADS=1 python bench/fp8_scaled_error.py
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from fp8_base import euler, loud_dit, one_call, rel  # noqa: E402

from flowtuner.families.qwen_image.dit import FP8_DEFAULT, FP8_POLICIES  # noqa: E402
from flowtuner.weights.fp8 import GRANULARITIES, Fp8Linear, quantise, quantise_module, quantise_scaled  # noqa: E402

LAYERS = {"img_mlp.net.0.proj 12288x3072": (12288, 3072, "tokens"), "attn.to_q 3072x3072": (3072, 3072, "tokens"),
          "img_mod.1 18432x3072": (18432, 3072, "silu")}


def heavy_tailed_weight(out: int, inp: int, g: torch.Generator) -> torch.Tensor:
    t = torch.distributions.StudentT(5.0).sample((out, inp))  # uses the global generator: seeded below
    t = t / (5.0 / 3.0) ** 0.5 * 0.02  # t(5) has variance 5/3
    rows = torch.exp(0.3 * torch.randn(out, 1, generator=g))
    cols = torch.exp(0.3 * torch.randn(1, inp, generator=g))
    return (t * rows * cols).to(torch.bfloat16)


def activations(inp: int, kind: str, g: torch.Generator) -> torch.Tensor:
    x = torch.randn(1024, inp, generator=g)
    if kind == "silu":
        return torch.nn.functional.silu(x[:1] * 2)
    x[:, torch.randperm(inp, generator=g)[:8]] *= 20
    return x


def layer_table() -> None:
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    print("| layer | plain e4m3fn | " + " | ".join(GRANULARITIES) + " |")
    for name, (out, inp, kind) in LAYERS.items():
        w, x = heavy_tailed_weight(out, inp, g), activations(inp, kind, g)
        ref = x @ w.float().T
        cells = [rel(ref, x @ quantise(w).float().T)]
        for gran in GRANULARITIES:
            layer = _fp8_linear(w, gran)
            cells.append(rel(ref, x @ layer.dequantised().T))
        print(f"| {name} | " + " | ".join(f"{n:.4f} / {m:.4f}" for m, n in cells) + " |")
    print("(norm / max)")
    for gran in GRANULARITIES:
        _, scale = quantise_scaled(torch.zeros(12288, 3072, dtype=torch.bfloat16), gran)
        print(f"{gran}: scale shape {tuple(scale.shape)} for 12288x3072, {scale.numel() * 4 / (12288 * 3072):.4f} "
              "bytes per weight")


def _fp8_linear(w: torch.Tensor, gran: str) -> Fp8Linear:
    layer = torch.nn.Linear(w.shape[1], w.shape[0], bias=False, device="meta")
    layer.__class__ = Fp8Linear
    q, scale = quantise_scaled(w, gran)
    layer.weight = torch.nn.Parameter(q, requires_grad=False)
    layer.register_buffer("scale_weight", scale)
    return layer


def dit_table() -> None:
    base = loud_dit()
    ref_call, ref_lat = one_call(base), euler(base)
    policy = FP8_POLICIES[FP8_DEFAULT]
    print("| granularity | one call: max / norm | latents: max / norm |")
    for gran in (None, *GRANULARITIES):
        model = quantise_module(copy.deepcopy(base), policy, gran)
        c, lat = rel(ref_call, one_call(model)), rel(ref_lat, euler(model))
        print(f"| {gran or 'plain e4m3fn'} | {c[0]:.4f} / {c[1]:.4f} | {lat[0]:.4f} / {lat[1]:.4f} |")
    lora_merge(base, ref_call, policy)


def lora_merge(base, ref_call, policy) -> None:
    """A LoRA merged into the scaled model (W + dW re-quantised with a recomputed scale) against hooks."""
    from fp8_base import random_lora

    from flowtuner.train.lora import LoRANetwork, merge_into

    lora = random_lora(base)
    merged_ref = copy.deepcopy(base)
    merge_into(merged_ref, lora)
    ref = one_call(merged_ref)
    effect = ref - ref_call
    fp8_out = one_call(quantise_module(copy.deepcopy(base), policy, "channel"))
    requant = quantise_module(copy.deepcopy(base), policy, "channel")
    merge_into(requant, lora)
    unmerged = quantise_module(copy.deepcopy(base), policy, "channel")
    LoRANetwork.from_weights(unmerged, lora, "bench").attach()
    for label, model in (("merge + re-quantise (new scale)", requant), ("unmerged (hooks)", unmerged)):
        out = one_call(model)
        print(f"channel, {label}: LoRA change error {float(((out - fp8_out) - effect).norm() / effect.norm()):.4f}; "
              f"output vs bf16+LoRA max / norm {rel(ref, out)[0]:.4f} / {rel(ref, out)[1]:.4f}")


if __name__ == "__main__":
    torch.set_num_threads(1)
    layer_table()
    dit_table()
