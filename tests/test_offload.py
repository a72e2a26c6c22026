"""Memory options of the training step: `--gradient_checkpointing_cpu_offload` (train/offload.py) and
`--split_attn` (families/qwen_image/attention.py), on the tiny Qwen-Image DiT, CPU."""

from __future__ import annotations

import logging

import pytest
import torch
from safetensors.torch import load_file

from flowtuner.cli import main
from flowtuner.families import get_family
from flowtuner.families.base import Conditioning
from flowtuner.families.qwen_image.family import QwenImageDenoiser, collate
from flowtuner.families.qwen_image.tiny import TEXT_HIDDEN, tiny_dit
from flowtuner.train.lora import LoRANetwork, select_modules
from flowtuner.train.objective import per_sample_loss
from flowtuner.train.offload import ActivationOffload, enable_checkpointing
from tests.datasets import good_dataset

LAYERS = 3


class CopyingOffload(ActivationOffload):
    """On a CPU device and host are one memory and `.to` is a no-op: copy explicitly, so the values the
    recomputation reads really went through a host copy; record the copies."""

    def __init__(self, blocks, device):
        super().__init__(blocks, device)
        self.copies: list[tuple[int, ...]] = []

    def to_host(self, t):
        self.copies.append(tuple(t.shape))
        return t.clone()


def two_steps(offload: bool, batch: int = 2):
    """Loss and LoRA gradients of two AdamW steps of a LoRA on the tiny DiT with gradient checkpointing."""
    torch.manual_seed(0)
    model = tiny_dit(layers=LAYERS).train().requires_grad_(False)
    blocks = model.transformer_blocks
    used = enable_checkpointing(model, blocks, "cpu", offload, CopyingOffload)
    family = get_family("qwen_image")
    network = LoRANetwork(model, select_modules(model, family.lora_default_targets(model), [], []), 4, 4.0).attach()
    for p in network.parameters():  # lora_up starts at zero: give every gradient something to carry
        torch.nn.init.normal_(p, std=0.05)
    optimizer = torch.optim.AdamW(network.parameters(), lr=1e-2)
    denoiser = QwenImageDenoiser(model)
    geometry = denoiser.geometry(64, 64)
    gen = torch.Generator().manual_seed(1)
    losses, grads = [], []
    for _ in range(2):
        x0 = torch.randn((batch,) + geometry.state_shape[1:], generator=gen)
        noise = torch.randn(x0.shape, generator=gen)
        cond = Conditioning(torch.randn(batch, 9, TEXT_HIDDEN, generator=gen))
        loss = per_sample_loss(lambda *a: denoiser.predict(*a), x0, noise, torch.full((batch,), 0.6), cond, geometry).mean()
        loss.backward()
        losses.append(loss.detach().clone())
        # the last block's text stream reaches no output: its LoRA has no gradient (None in both runs)
        grads.append([None if p.grad is None else p.grad.clone() for p in network.parameters()])
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return losses, grads, used


def test_activation_offload_is_bit_identical_over_two_steps():
    plain_loss, plain_grads, _ = two_steps(False)
    loss, grads, offload = two_steps(True)
    for a, b in zip(plain_loss, loss):
        assert torch.equal(a, b)
    for step_a, step_b in zip(plain_grads, grads):
        assert all((a is None and b is None) or torch.equal(a, b) for a, b in zip(step_a, step_b))
        assert sum(a is not None for a in step_a) > len(step_a) // 2
    # per step: every block runs once forward and once recomputed; in the forward every block but the last hands
    # its two streams (image, text) to the host (the recomputation stops once the block's saved tensors exist:
    # torch's non-reentrant checkpoint stops early, before the copy out)
    assert offload.calls == 2 * 2 * LAYERS
    assert len(offload.copies) == 2 * (LAYERS - 1) * 2
    assert {shape[0] for shape in offload.copies} == {2}


def test_offload_needs_gradient_checkpointing_in_one_line(capsys):
    for argv in (["train", "--dit", "x.safetensors", "--dataset_config", "d.toml", "--gradient_checkpointing_cpu_offload"],
                 ["plan", "train", "--gradient_checkpointing_cpu_offload"]):
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert "add --gradient_checkpointing" in err and "\n" not in err


def _split_batch():
    torch.manual_seed(0)
    model = tiny_dit(layers=2).eval()
    denoiser = QwenImageDenoiser(model)
    geometry = denoiser.geometry(64, 64)
    gen = torch.Generator().manual_seed(2)
    conds = [Conditioning(torch.randn(1, n, TEXT_HIDDEN, generator=gen) * 3) for n in (5, 13)]
    x = torch.randn((2,) + geometry.state_shape[1:], generator=gen)
    return model, denoiser, geometry, conds, x


def test_split_attention_equals_the_masked_batch():
    """Batch of 2 prompts of 5 and 13 tokens: the padded, masked batch against each sample attending over its own
    tokens only (no mask); also against each sample run alone."""
    model, denoiser, geometry, conds, x = _split_batch()
    cond = collate(conds)
    assert cond.mask is not None
    sigma = torch.tensor([0.3, 0.8])
    with torch.no_grad():
        masked = denoiser.predict(x, sigma, cond, geometry)
        alone = torch.cat([denoiser.predict(x[i:i + 1], sigma[i:i + 1], conds[i], geometry) for i in range(2)])
        get_family("qwen_image").split_attention(model)
        split = denoiser.predict(x, sigma, cond, geometry)
        unmasked = denoiser.predict(x, sigma, Conditioning(cond.embeds), geometry)  # padding attended to
    scale = masked.abs().max()
    print("split vs masked", float((split - masked).abs().max() / scale), "split vs alone",
          float((split - alone).abs().max() / scale), "unmasked padding vs masked", float((unmasked - masked).abs().max() / scale))
    assert (split - masked).abs().max() / scale < 1e-5
    assert (split - alone).abs().max() / scale < 1e-5
    assert (unmasked - masked).abs().max() / scale > 1e-3  # what a backend that ignores the mask would give


def test_split_attention_gradients_match_the_masked_batch():
    model, denoiser, geometry, conds, x = _split_batch()
    cond, sigma = collate(conds), torch.tensor([0.3, 0.8])

    def grad():
        xi = x.clone().requires_grad_(True)
        denoiser.predict(xi, sigma, cond, geometry).square().sum().backward()
        return xi.grad

    masked = grad()
    get_family("qwen_image").split_attention(model)
    split = grad()
    assert (split - masked).abs().max() / masked.abs().max() < 1e-5


@pytest.fixture(scope="module")
def cached(tmp_path_factory, tiny_files):
    root = tmp_path_factory.mktemp("offload")
    cfg = good_dataset(root, sizes=[(64, 64)] * 4)
    for kind in ("latents", "text"):
        assert main([f"cache-{kind}", "--dataset_config", str(cfg), "--model", str(tiny_files["repo"]), "--device", "cpu"]) == 0
    return cfg


def test_train_with_offload_or_split_attn_saves_the_same_lora_and_prints_the_plan(tmp_path, cached, tiny_files, caplog,
                                                                                  monkeypatch):
    import flowtuner.plan

    monkeypatch.setattr(flowtuner.plan, "STARTUP_DEVICES", ("cuda", "cpu"))  # CPU runs do not plan by default
    def train(out, *extra):
        assert main(["train", "--dataset_config", str(cached), "--model", str(tiny_files["repo"]), "--device", "cpu",
                     "--output_dir", str(out), "--seed", "3", "--max_data_loader_n_workers", "0", "--max_train_steps", "2",
                     "--learning_rate", "0.01", "--gradient_checkpointing", *extra]) == 0
        return load_file(str(out / "lora.safetensors"))

    with caplog.at_level(logging.INFO, logger="flowtuner.plan"):
        plain = train(tmp_path / "a")
    plan_lines = [r.getMessage() for r in caplog.records if r.name == "flowtuner.plan"]
    assert len(plan_lines) == 1 and "device peak" in plan_lines[0] and "host peak" in plan_lines[0]
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="flowtuner.plan"):
        offloaded = train(tmp_path / "b", "--gradient_checkpointing_cpu_offload", "--no_plan")
    assert not [r for r in caplog.records if r.name == "flowtuner.plan"]
    assert all(torch.equal(plain[k], offloaded[k]) for k in plain)
    split = train(tmp_path / "c", "--split_attn")  # batches of 2 captions of different lengths
    assert not all(torch.equal(plain[k], split[k]) for k in plain)  # the per-sample path ran
    worst = max(float((plain[k] - split[k]).abs().max() / plain[k].abs().max().clamp_min(1e-12)) for k in plain)
    print("split_attn LoRA after 2 steps, worst relative difference", worst)
    assert worst < 5e-4  # float rounding through 2 AdamW steps: measured 1.9e-5 and 1.2e-4 on two noise draws


def test_start_plan_warns_in_one_line_when_the_device_is_smaller(cached, tiny_files, caplog, monkeypatch):
    """A CUDA device (faked: this machine has none) smaller than the planned peak gets one warning line."""
    from types import SimpleNamespace

    from flowtuner.config.train import TrainConfig
    from flowtuner.plan import startup_plan

    family = get_family("qwen_image")
    paths = family.resolve_paths(dit=None, vae=None, text_encoder=None, tokenizer=None, model=str(tiny_files["repo"]),
                                 comfyui_dir=None)
    cfg = TrainConfig(dataset_config=str(cached), gradient_checkpointing=True)
    sizes = iter([1024**2, 1024**4])  # 1 MiB, then 1 TiB
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: SimpleNamespace(total_memory=next(sizes)))
    for warned in (True, False):
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="flowtuner.plan"):
            plan = startup_plan(family, paths, cfg, "train", torch.device("cuda"))
        warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
        assert plan is not None and len(warnings) == int(warned)
        assert not warned or ("exceeds" in warnings[0] and "\n" not in warnings[0])
    assert startup_plan(family, paths, cfg, "train", torch.device("cpu")) is None  # CPU runs do not plan
