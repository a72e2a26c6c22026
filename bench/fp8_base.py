"""`--fp8_base` error against bf16 on the loud tiny DiT: which Linears to store in fp8 (the policies of
flowtuner.families.qwen_image.dit.FP8_POLICIES) and how to apply a LoRA to an fp8 model (merge + re-quantise vs unmerged).

The loud tiny DiT is tests/test_edit_dit.py's (QK-norm gains and modulation x3, so errors do not hide in a
flat model). Everything runs in bf16 on the CPU; errors are relative to the bf16 model's output:
max |a - b| / max |a| and ||a - b|| / ||a||, for one DiT call (sigma 0.5) and for the latents of an 8-step
Euler run from the same noise. The LoRA error compares what the LoRA changes on the fp8 model with what it changes on the bf16 one.

    python bench/fp8_base.py
"""

from __future__ import annotations

import copy

import torch

from flowtuner.families.qwen_image.tiny import tiny_dit
from flowtuner.train.lora import LoRANetwork, LoRAWeights, merge_into
from flowtuner.families.qwen_image.dit import FP8_DEFAULT, FP8_POLICIES as POLICIES
from flowtuner.weights.fp8 import fp8_bytes, quantise_module

DT = torch.bfloat16


def loud_dit():
    dit = tiny_dit(layers=4)
    with torch.no_grad():
        for name, p in dit.named_parameters():
            if ".norm_q." in name or ".norm_k." in name or ".norm_added_" in name or "_mod." in name:
                p.mul_(3.0)
    return dit.to(DT).requires_grad_(False)


def inputs(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(1, 64, 64, generator=g).to(DT), torch.randn(1, 24, 128, generator=g).to(DT)


def call(dit, x, text, sigma: float):
    return dit(hidden_states=x, encoder_hidden_states=text, timestep=torch.tensor([sigma]), img_shapes=[[(1, 8, 8)]],
               return_dict=False)[0]


@torch.no_grad()
def euler(dit, steps: int = 8):
    x, text = inputs()
    sigmas = torch.linspace(1, 0, steps + 1)
    for s, t in zip(sigmas[:-1], sigmas[1:]):
        x = x + (t - s) * call(dit, x, text, float(s))
    return x.float()


@torch.no_grad()
def one_call(dit):
    x, text = inputs()
    return call(dit, x, text, 0.5).float()


def rel(a, b) -> tuple[float, float]:
    return float((a - b).abs().max() / a.abs().max()), float((a - b).norm() / a.norm())


def random_lora(dit, rank: int = 4, seed: int = 1) -> dict[str, LoRAWeights]:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for path in sorted(POLICIES["blocks"].targets(dit)):
        m = dit.get_submodule(path)
        out[path] = LoRAWeights(torch.randn(rank, m.in_features, generator=g) * 0.05,
                                torch.randn(m.out_features, rank, generator=g) * 0.05, float(rank))
    return out


def main() -> None:
    base = loud_dit()
    ref_call, ref_lat = one_call(base), euler(base)
    print("policy          fp8 byte share  call max / norm      latents max / norm")
    for name in POLICIES:
        model = quantise_module(copy.deepcopy(base), POLICIES[name])
        f8, total = fp8_bytes(model)
        c, lat = rel(ref_call, one_call(model)), rel(ref_lat, euler(model))
        print(f"{name:15s} {f8 / total:6.3f}          {c[0]:.4f} / {c[1]:.4f}     {lat[0]:.4f} / {lat[1]:.4f}")

    lora = random_lora(base)
    merged_ref = copy.deepcopy(base)
    merge_into(merged_ref, lora)
    ref = one_call(merged_ref)
    effect = ref - ref_call  # what the LoRA changes in bf16
    fp8_base = one_call(quantise_module(copy.deepcopy(base), POLICIES[FP8_DEFAULT]))
    requant = quantise_module(copy.deepcopy(base), POLICIES[FP8_DEFAULT])
    merge_into(requant, lora)
    unmerged = quantise_module(copy.deepcopy(base), POLICIES[FP8_DEFAULT])
    network = LoRANetwork.from_weights(unmerged, lora, "bench").attach()
    print(f"LoRA effect ||ref - base|| / ||ref||: {float(effect.norm() / ref.norm()):.4f}")
    for label, model in (("merge + re-quantise", requant), ("unmerged (hooks)", unmerged)):
        out = one_call(model)
        print(f"{label:22s} LoRA change error ||(out - fp8 base) - (ref - base)|| / ||ref - base|| = "
              f"{float(((out - fp8_base) - effect).norm() / effect.norm()):.4f}; output vs bf16+LoRA "
              f"max / norm {rel(ref, out)[0]:.4f} / {rel(ref, out)[1]:.4f}")
    network.detach()


if __name__ == "__main__":
    main()
