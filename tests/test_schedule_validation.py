"""The big-batch schedule (warmup and cosine counted in samples, as Composer's CosineAnnealingWithWarmupScheduler
counts them in the bigASP recipe) and the fixed-sigma, fixed-noise validation loss."""

from __future__ import annotations

import logging
import math

import pytest
import torch

from flowtuner.errors import ConfigError
from flowtuner.train.optim import GlobalBatch, ScheduleOptions, make_schedule


def _factors(name: str, total_steps: int, opts: ScheduleOptions) -> list[float]:
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = make_schedule(name, opt, total_steps, opts)
    out = []
    for _ in range(total_steps):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


# Composer's CosineAnnealingWithWarmupScheduler(t_warmup=10sp, t_max=100sp, alpha_f), evaluated at the samples
# seen before each step of 4: t = 4 i. lr(t) = t / 10 for t < 10, else
# alpha_f + (1 - alpha_f) * 0.5 * (1 + cos(pi * (t - 10) / 90)). Values computed by hand from that formula:
#   step 2: t = 8  -> 0.8 (warmup: the warmup ends inside step 3, not at a rounded step)
#   step 3: t = 12 -> 0.5 * (1 + cos(4 deg)) = 0.998782025
#   step 14: t = 56 -> 0.5 * (1 + cos(92 deg)) = 0.482550252
#   step 24: t = 96 -> 0.5 * (1 + cos(172 deg)) = 0.004865966
COMPOSER = {0.0: {0: 0.0, 1: 0.4, 2: 0.8, 3: 0.998782025, 14: 0.482550252, 24: 0.004865966},
            0.1: {0: 0.0, 2: 0.8, 3: 0.1 + 0.9 * 0.998782025, 14: 0.1 + 0.9 * 0.482550252, 24: 0.1 + 0.9 * 0.004865966}}


@pytest.mark.parametrize("alpha_f", [0.0, 0.1])
def test_sample_clock_reproduces_composers_cosine_with_warmup(alpha_f):
    name = "cosine" if alpha_f == 0 else "cosine_with_min_lr"
    opts = ScheduleOptions(min_lr_ratio=alpha_f or None, warmup_samples=10, total_samples=100, samples_per_step=4)
    got = _factors(name, 25, opts)
    for step, value in COMPOSER[alpha_f].items():
        assert got[step] == pytest.approx(value, abs=1e-8), step


def test_sample_clock_equals_diffusers_and_transformers_where_steps_are_whole():
    """A warmup and a run that are whole numbers of global batches: the sample clock is the step clock."""
    from diffusers.optimization import get_cosine_schedule_with_warmup
    from transformers.optimization import get_cosine_with_min_lr_schedule_with_warmup

    def reference(make):
        opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
        sched, out = make(opt), []
        for _ in range(25):
            out.append(opt.param_groups[0]["lr"])
            opt.step()
            sched.step()
        return out

    samples = ScheduleOptions(warmup_samples=12, total_samples=100, samples_per_step=4)
    assert _factors("cosine", 25, samples) == pytest.approx(reference(lambda o: get_cosine_schedule_with_warmup(o, 3, 25)),
                                                            abs=1e-12)
    with_min = ScheduleOptions(min_lr_ratio=0.1, warmup_samples=12, total_samples=100, samples_per_step=4)
    ref = reference(lambda o: get_cosine_with_min_lr_schedule_with_warmup(o, 3, 25, min_lr_rate=0.1))
    assert _factors("cosine_with_min_lr", 25, with_min) == pytest.approx(ref, abs=1e-12)
    # step flags keep meaning steps: --lr_warmup_steps 3 with --max_train_samples converts at the global batch
    assert _factors("cosine", 25, ScheduleOptions(warmup=3, total_samples=100, samples_per_step=4)) == \
        pytest.approx(_factors("cosine", 25, samples), abs=1e-12)


def test_sample_units_refusals():
    with pytest.raises(ConfigError, match="rex is defined on step indices"):
        _factors("rex", 4, ScheduleOptions(warmup_samples=4, samples_per_step=2))
    with pytest.raises(ConfigError, match="--lr_warmup_samples 300 exceeds the run's 100 samples"):
        _factors("cosine", 4, ScheduleOptions(warmup_samples=300, total_samples=100, samples_per_step=2))
    with pytest.raises(ConfigError, match="--lr_warmup_samples has no effect with --lr_scheduler constant"):
        _factors("constant", 4, ScheduleOptions(warmup_samples=3, samples_per_step=2))
    from flowtuner.config.train import TrainConfig

    with pytest.raises(ConfigError, match="--lr_warmup_samples or --lr_warmup_steps"):
        TrainConfig(lr_warmup_samples=10, lr_warmup_steps=2)
    with pytest.raises(ConfigError, match="--max_train_samples or --max_train_epochs"):
        TrainConfig(max_train_samples=10, max_train_epochs=2)
    with pytest.raises(ConfigError, match="--max_train_samples 0: must be at least 1"):
        TrainConfig(max_train_samples=0)


def test_global_batch_is_micro_batch_times_accumulation_times_processes():
    batch = GlobalBatch((16,), 8, 32)
    assert batch.samples == 4096  # the recipe: 16 per micro-batch, 8 accumulated, 32 GPUs
    # max_duration 150M samples (shared/reference/sdxl-flow-recipe.md §A4): Composer trains while the sample count is
    # below it, so 36,621 full steps (149,999,616 samples) are followed by one more; the reference's 36,621 floors
    assert batch.steps(150_000_000) == 36_622
    assert batch.describe() == ("global batch 16 (batch_size) x 8 (--gradient_accumulation_steps) x 32 (processes) = "
                                "4096 samples per optimizer step")
    with pytest.raises(ConfigError, match="one batch_size across the datasets"):
        GlobalBatch((1, 2), 1, 1).samples
    assert "1/2 (batch_size)" in GlobalBatch((1, 2), 1, 1).describe()  # logged even when the schedule counts steps


# ------------------------------------------------------------------------------------ through the trainer
@pytest.fixture(scope="module")
def cached(tmp_path_factory, tiny_files):
    from flowtuner.cli import main
    from tests.datasets import good_dataset

    root = tmp_path_factory.mktemp("schedule")
    cfg = good_dataset(root, sizes=[(64, 64)] * 4)  # batch_size 2
    for kind in ("latents", "text"):
        assert main([f"cache-{kind}", "--dataset_config", str(cfg), "--model", str(tiny_files["repo"]), "--device", "cpu"]) == 0
    return cfg


def test_trainer_counts_the_run_and_warmup_in_samples(tmp_path, cached, tiny_files, caplog, monkeypatch):
    from safetensors import safe_open

    from flowtuner.cli import main
    from flowtuner.train import loop

    seen = []
    original = loop.make_schedule

    def spy(name, optimizer, total, opts):
        seen.append((name, total, opts))
        return original(name, optimizer, total, opts)

    monkeypatch.setattr(loop, "make_schedule", spy)
    with caplog.at_level(logging.INFO, logger="flowtuner"):
        assert main(["train", "--dataset_config", str(cached), "--model", str(tiny_files["repo"]), "--device", "cpu",
                     "--output_dir", str(tmp_path), "--seed", "1", "--max_data_loader_n_workers", "0", "--network_dim", "2",
                     "--gradient_accumulation_steps", "2", "--max_train_samples", "10", "--lr_warmup_samples", "6",
                     "--lr_scheduler", "cosine"]) == 0
    # 2 per micro-batch x 2 accumulated x 1 process = 4 samples per step: 10 samples take 3 steps
    assert "global batch 2 (batch_size) x 2 (--gradient_accumulation_steps) x 1 (processes) = 4 samples" in caplog.text
    name, total, opts = seen[0]
    assert (name, total, opts.samples_per_step, opts.warmup_samples, opts.total_samples) == ("cosine", 3, 4, 6, 10)
    with safe_open(str(tmp_path / "lora.safetensors"), "pt") as f:
        assert f.metadata()["ss_steps"] == "3"


# ------------------------------------------------------------------------------------ validation
def _validator(cached, tiny_files, tmp_path, timesteps=4):
    from flowtuner.config.train import TrainConfig
    from flowtuner.train.loop import Trainer, TrainModule

    cfg = TrainConfig(dataset_config=str(cached), model=str(tiny_files["repo"]), device="cpu", output_dir=str(tmp_path),
                      validation_dataset_config=str(cached), seed=0, validation_timesteps=timesteps)
    trainer = Trainer(cfg)
    denoiser = trainer.family.load_denoiser(trainer.family.resolve_paths(model=tiny_files["repo"]), torch.device("cpu"))
    return trainer._validator(denoiser, torch.device("cpu")), TrainModule(denoiser, None), denoiser


def test_validation_is_the_same_number_each_time_and_moves_with_the_weights(tmp_path, cached, tiny_files):
    validator, module, denoiser = _validator(cached, tiny_files, tmp_path)
    assert validator.sigmas == pytest.approx([0.125, 0.375, 0.625, 0.875])  # stratified, the flow objective's own
    first, second = validator(module), validator(module)
    assert first == second and first > 0
    with torch.no_grad():
        next(p for p in denoiser.module.parameters() if p.dim() > 1).mul_(1.5)
    third = validator(module)
    assert third != first and math.isfinite(third)
    assert validator(module) == third


def test_validation_noise_is_per_item_not_per_batch(tmp_path, cached, tiny_files):
    """The same items in batches of 1 or 2, in another order: the same loss (noise seeded by item and sigma)."""
    from flowtuner.data.loader import BatchPlan

    validator, module, _ = _validator(cached, tiny_files, tmp_path)
    paired = validator(module)
    plan = validator.plan
    plan.batch_sizes = {k: 1 for k in plan.batch_sizes}
    plan.seed = 5  # another order
    single = validator(module)
    assert single == pytest.approx(paired, rel=1e-6)
    assert isinstance(plan, BatchPlan)
    noise = validator.noise("img0", 1, (2, 3))
    assert torch.equal(noise, validator.noise("img0", 1, (2, 3)))
    assert not torch.equal(noise, validator.noise("img0", 2, (2, 3)))
    assert not torch.equal(noise, validator.noise("img1", 1, (2, 3)))
