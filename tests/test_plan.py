"""`flowtuner plan`: its prediction (fake tensors, 1 and 2 traced blocks, extrapolated) against the peak of
the same step measured on real tensors of a small model; the JSON schema; bad input in one line."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from flowtuner.cli import main
from flowtuner.families.qwen_image.family import QwenImageDenoiser
from flowtuner.families.qwen_image.tiny import tiny_dit
from flowtuner.plan import LiveStorages, PlanSettings, TracedOffload, _inputs, make_plan
from flowtuner.train.lora import LoRANetwork, select_modules
from flowtuner.train.objective import per_sample_loss
from flowtuner.families import get_family

LAYERS, SIZE, TOKENS = 4, 256, 32


@pytest.fixture(scope="module")
def dit_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("plan") / "dit.safetensors"
    save_file({k: v.contiguous() for k, v in tiny_dit(layers=LAYERS).state_dict().items()}, str(path))
    return path


def planned(dit_file, target: str, *flags: str, capsys) -> dict:
    assert main(["plan", target, "--dit", str(dit_file), "--text_tokens", str(TOKENS), "--json", *flags]) == 0
    return json.loads(capsys.readouterr().out)


def settings(mode: str, **kw) -> PlanSettings:
    return PlanSettings(mode, SIZE, SIZE, kw.pop("batch", 1), TOKENS, **kw)


def measure_lora(s: PlanSettings, host: bool = False):
    """The peak of a real LoRA step (model built inside the tracker so its weights count); with `host`, also the
    peak of the host copies an activation offload made (on a CPU they are explicit copies the tracker counts
    apart: the same wrapper the trainer uses, with `.to(host)` made a real copy)."""
    tracker = LiveStorages()
    with tracker:
        model = tiny_dit(layers=LAYERS).train().requires_grad_(False)
        if s.fp8_base:  # the loader quantises as the file streams in: the full-precision moment is not the step's
            from flowtuner.families.qwen_image.dit import FP8_DEFAULT, FP8_POLICIES
            from flowtuner.weights.fp8 import quantise_module

            quantise_module(model, FP8_POLICIES[FP8_DEFAULT])
            tracker.restart_peak()
        if s.gradient_checkpointing:
            offload = TracedOffload(tracker, model.transformer_blocks) if s.gradient_checkpointing_cpu_offload else None
            model.enable_gradient_checkpointing(offload)
        family = get_family("qwen_image")
        network = LoRANetwork(model, select_modules(model, family.lora_default_targets(model), [], []), s.network_dim,
                              s.network_alpha).attach()
        params = list(network.parameters())
        optimizer = torch.optim.AdamW(params, lr=1e-4)
        denoiser = QwenImageDenoiser(model)
        x0, noise, sigma, cond, geometry = _inputs(spec_stub(), s, denoiser)
        autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=s.mixed_precision == "bf16")
        for _ in range(2):  # the second step is the one a run repeats: the optimizer state lives through it
            with autocast:
                loss = per_sample_loss(lambda *a: denoiser.predict(*a), x0, noise, sigma, cond, geometry).mean()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    return (tracker.peak, tracker.host_peak) if host else tracker.peak


def spec_stub():
    from flowtuner.families.qwen_image.tiny import TEXT_HIDDEN

    return type("S", (), {"text_width": TEXT_HIDDEN})()


@pytest.mark.parametrize("flags,kw", [
    ((), {}),
    (("--gradient_checkpointing", "--mixed_precision", "bf16", "--network_dim", "8"),
     {"gradient_checkpointing": True, "mixed_precision": "bf16", "network_dim": 8}),
    (("--fp8_base", "--mixed_precision", "bf16"), {"fp8_base": True, "mixed_precision": "bf16"}),
])
def test_lora_plan_matches_a_measured_step(dit_file, capsys, flags, kw):
    plan = planned(dit_file, "train", "--resolution", str(SIZE), str(SIZE), *flags, capsys=capsys)
    real = measure_lora(settings("train", **kw))
    assert plan["device_peak_gib"] * 1024**3 == pytest.approx(real, rel=0.10)
    assert plan["settings"]["blocks"] == LAYERS


def test_finetune_plan_matches_torch_mem_tracker(dit_file, capsys):
    """Full fine-tuning: every parameter trains, so torch's own MemTracker can measure the real step."""
    from torch.distributed._tools.mem_tracker import MemTracker

    plan = planned(dit_file, "finetune", "--resolution", str(SIZE), str(SIZE), capsys=capsys)
    model = tiny_dit(layers=LAYERS).train().requires_grad_(True)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6)
    denoiser = QwenImageDenoiser(model)
    x0, noise, sigma, cond, geometry = _inputs(spec_stub(), settings("finetune"), denoiser)

    def step():
        per_sample_loss(lambda *a: denoiser.predict(*a), x0, noise, sigma, cond, geometry).mean().backward()
        torch.nn.utils.clip_grad_norm_(list(model.parameters()), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()  # measured: the second step, the one a run repeats (the optimizer state lives through it)
    tracker = MemTracker()
    tracker.track_external(model, optimizer)
    with tracker:
        step()
    real = tracker.get_tracker_snapshot("peak")[torch.device("cpu")]["Total"]
    assert plan["device_peak_gib"] * 1024**3 == pytest.approx(real, rel=0.10)
    # at this tiny size the steady-state peak is the forward's end (activations beat the gradients), with AdamW's state
    assert plan["components"]["optimizer_state"] > 0 and plan["components"]["weights"] > 0


def test_generate_plan_matches_a_measured_call(dit_file, capsys):
    plan = planned(dit_file, "generate", "--image_size", str(SIZE), str(SIZE), capsys=capsys)
    tracker = LiveStorages()
    with tracker:
        model = tiny_dit(layers=LAYERS)
        denoiser = QwenImageDenoiser(model)
        x, _, sigma, cond, geometry = _inputs(spec_stub(), settings("generate"), denoiser)
        with torch.no_grad():
            denoiser.predict(x, sigma, cond, geometry)
    assert plan["phases"]["dit"] * 1024**3 == pytest.approx(tracker.peak, rel=0.10)


def test_json_schema_and_published_sizes(capsys):
    assert main(["plan", "train", "--model_version", "original", "--gradient_checkpointing", "--mixed_precision", "bf16",
                 "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert {"device_peak_gib", "host_peak_gib", "components", "host_components", "settings"} <= set(out)
    assert set(out["components"]) <= {"weights", "lora", "optimizer_state", "gradients", "activations"}
    assert out["components"]["weights"] == pytest.approx(38.05, abs=0.01)  # 20,430,401,088 bf16 parameters
    assert out["device_peak_gib"] == pytest.approx(sum(out["components"].values()), abs=0.01)
    assert out["settings"]["blocks"] == 60 and out["settings"]["height"] == 1024


def test_activation_offload_plan_matches_a_measured_step(dit_file, capsys):
    """--gradient_checkpointing_cpu_offload: the device peak without the checkpointed block inputs, and those inputs
    as host memory, each within 10 % of the real step."""
    from flowtuner.families.base import ModelPaths

    flags = ("--gradient_checkpointing", "--gradient_checkpointing_cpu_offload", "--mixed_precision", "bf16")
    plan = planned(dit_file, "train", "--resolution", str(SIZE), str(SIZE), *flags, capsys=capsys)
    s = settings("train", gradient_checkpointing=True, gradient_checkpointing_cpu_offload=True, mixed_precision="bf16")
    device, host = measure_lora(s, host=True)
    assert plan["device_peak_gib"] * 1024**3 == pytest.approx(device, rel=0.10)
    exact = make_plan(get_family("qwen_image").plan_spec(ModelPaths(dit=dit_file)), s)  # bytes (the JSON rounds to MiB)
    assert exact.host_components["offloaded_activations"] == pytest.approx(host, rel=0.10)
    assert exact.device_peak == pytest.approx(device, rel=0.10)
    plain = measure_lora(settings("train", gradient_checkpointing=True, mixed_precision="bf16"))
    assert device <= plain  # at this tiny width the boundaries are too small to move the peak (real size: below)
    print(f"offload: planned / measured device {exact.device_peak / device:.3f}, host "
          f"{exact.host_components['offloaded_activations'] / host:.3f}; measured device {device} vs {plain} without")


def test_offload_and_swap_rows_at_real_size(capsys):
    """Qwen-Image LoRA at 1024²: the offloaded inputs are the 59 block boundaries (image + text tokens x 3072, bf16);
    block swap keeps resident_blocks blocks' weights on the device and the swapped ones on the host."""
    from flowtuner.weights.block_swap import resident_blocks

    common = ["plan", "train", "--model_version", "original", "--mixed_precision", "bf16", "--gradient_checkpointing",
              "--fp8_base", "--json"]

    def plan(*flags):
        assert main([*common, *flags]) == 0
        return json.loads(capsys.readouterr().out)

    base, swapped, offloaded = plan(), plan("--blocks_to_swap", "16"), plan("--gradient_checkpointing_cpu_offload")
    boundary = (4096 + 256) * 3072 * 2 / 1024**3
    assert offloaded["host_components"]["offloaded_activations"] == pytest.approx(59 * boundary, rel=0.01)
    assert offloaded["device_peak_gib"] < base["device_peak_gib"] - 0.5
    per_block = swapped["host_components"]["swap_buffers"] / 16
    assert per_block == pytest.approx(19.0 / 60, rel=0.05)  # fp8 block weights: ~19 GiB over 60 blocks
    off_device = (60 - resident_blocks(60, 16)) * per_block
    assert base["components"]["weights"] - swapped["components"]["weights"] == pytest.approx(off_device, abs=0.01)
    assert base["device_peak_gib"] - swapped["device_peak_gib"] == pytest.approx(off_device, abs=0.01)
    assert swapped["host_peak_gib"] >= swapped["host_components"]["swap_buffers"]


@pytest.mark.parametrize("argv,needle", [
    (["plan", "train", "--model_version", "flux9"], "unknown model version"),
    (["plan", "finetune", "--fp8_base"], "cannot train fp8 weights"),
    (["plan", "generate", "--blocks_to_swap", "60"], "at most 59"),
    (["plan", "finetune", "--blocks_to_swap", "4"], "finetune refuses it"),
    (["plan", "train", "--gradient_checkpointing_cpu_offload"], "add --gradient_checkpointing"),
    (["plan", "train", "--resolution", "1000", "1024"], "multiples of 16"),
    (["plan", "train", "--batch_size", "0"], "at least 1"),
    (["plan", "train", "--optimizer_type", "Lion"], "the plan knows"),
    (["plan", "finetune", "--full_bf16"], "needs --mixed_precision bf16"),
    (["plan", "train", "--model_version", "edit"], "not available yet"),
    (["plan", "finetune", "--optimizer_type", "adafactor", "--fused_backward_pass"], "does not model it yet"),
])
def test_bad_input_is_one_line(capsys, argv, needle):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert needle in err and "\n" not in err


def test_fp8_base_halves_the_planned_weights_at_real_size(capsys):
    """--fp8_base: the block Linears count at one byte per weight (the trace quantises the model it builds, as the
    loader quantises the file as it streams in)."""
    common = ["plan", "train", "--model_version", "original", "--mixed_precision", "bf16", "--gradient_checkpointing", "--json"]
    assert main(common) == 0
    plain = json.loads(capsys.readouterr().out)
    assert main([*common, "--fp8_base"]) == 0
    fp8 = json.loads(capsys.readouterr().out)
    assert fp8["components"]["weights"] < 0.55 * plain["components"]["weights"]
    assert fp8["device_peak_gib"] < 0.6 * plain["device_peak_gib"]  # 22.2 against 40.8 GiB, measured
