"""Schedules against the reference values and diffusers' scheduler; sampler and CFG against their formulas."""

from __future__ import annotations

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from flowtuner.flow.convention import noisy, velocity_target, x0_from_v
from flowtuner.flow.samplers import euler
from flowtuner.families.qwen_image.family import SHIFT_LINE
from flowtuner.flow.schedules import reference_sigmas
from flowtuner.guidance.cfg import guided_model, norm_rescaled_cfg
from tests.reference import QWEN_SCHEDULER

# ../shared/reference/qwen-image.md §11.1: image tokens -> mu, 50-step sigma[1], sigma[25], sigma[-2]
TABLE = [(1024, 0.5387, 0.9881, 0.6263, 0.0533), (4096, 0.6935, 0.9897, 0.6601, 0.0585),
         (6889, 0.8343, 0.9910, 0.6894, 0.0638), (6032, 0.7911, 0.9906, 0.6806, 0.0621),
         (16384, 1.3129, 0.9942, 0.7765, 0.0871)]


@pytest.mark.parametrize("tokens,mu,s1,s25,s_last2", TABLE)
def test_reference_table(tokens, mu, s1, s25, s_last2):
    assert SHIFT_LINE.mu(tokens) == pytest.approx(mu, abs=1e-4)
    s = reference_sigmas(50, tokens, SHIFT_LINE)
    assert len(s) == 51 and s[-1] == 0 and s[-2] == pytest.approx(0.02, abs=1e-6)
    assert [round(float(s[i]), 4) for i in (1, 25, -3)] == [s1, s25, s_last2]


def test_few_step_schedules_at_1024():
    assert reference_sigmas(2, 4096, SHIFT_LINE).tolist() == pytest.approx([1.0, 0.02, 0.0], abs=1e-6)
    assert reference_sigmas(4, 4096, SHIFT_LINE).tolist() == pytest.approx([1.0, 0.7667, 0.4556, 0.02, 0.0], abs=1e-4)
    assert reference_sigmas(8, 4096, SHIFT_LINE).tolist() == pytest.approx([1.0, .916, .820, .7093, .5801, .4273, .2441, .02, 0], abs=1e-3)


def test_one_step_is_finite():
    """The reference returns [NaN, 0] for one step (division by zero in the terminal stretch)."""
    assert reference_sigmas(1, 4096, SHIFT_LINE).tolist() == [1.0, 0.0]


@pytest.mark.parametrize("steps", [3, 20, 50])
@pytest.mark.parametrize("tokens", [24, 1024, 6889])
def test_bit_identical_to_diffusers(steps, tokens):
    sched = FlowMatchEulerDiscreteScheduler(**QWEN_SCHEDULER)
    import numpy as np

    sched.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), mu=SHIFT_LINE.mu(tokens))
    assert torch.equal(reference_sigmas(steps, tokens, SHIFT_LINE), sched.sigmas)


def test_fixed_flow_shift_matches_diffusers():
    import numpy as np

    sched = FlowMatchEulerDiscreteScheduler(**{**QWEN_SCHEDULER, "use_dynamic_shifting": False, "shift": 3.0})
    sched.set_timesteps(sigmas=np.linspace(1.0, 1 / 10, 10))
    assert torch.equal(reference_sigmas(10, 4096, SHIFT_LINE, flow_shift=3.0), sched.sigmas)


def test_convention_round_trip():
    x0, eps, sigma = torch.randn(4, 8), torch.randn(4, 8), torch.tensor(0.3)
    xt = noisy(x0, eps, sigma)
    torch.testing.assert_close(x0_from_v(xt, velocity_target(x0, eps), sigma), x0)


def test_euler_lands_on_the_data_point_for_the_exact_velocity():
    """For data concentrated at x0 the exact velocity is (x - x0) / sigma; Euler is then exact."""
    x0 = torch.randn(2, 5, 3)
    noise = torch.randn_like(x0)
    model = lambda x, s: (x - x0) / s  # noqa: E731
    out = euler(model, noise, reference_sigmas(7, 1024, SHIFT_LINE))
    torch.testing.assert_close(out, x0, atol=1e-5, rtol=0)


def test_norm_rescaled_cfg_formula():
    cond, uncond = torch.randn(2, 6, 64), torch.randn(2, 6, 64)
    out = norm_rescaled_cfg(cond, uncond, 4.0, -1)
    comb = uncond + 4.0 * (cond - uncond)
    torch.testing.assert_close(out, comb * cond.norm(dim=-1, keepdim=True) / comb.norm(dim=-1, keepdim=True))
    torch.testing.assert_close(out.norm(dim=-1), cond.norm(dim=-1))
    torch.testing.assert_close(norm_rescaled_cfg(cond, uncond, 1.0, -1), cond)


def test_unconditional_pass_skipped_at_scale_one():
    calls = []
    predict = lambda x, s, c: calls.append(c) or x  # noqa: E731
    guided_model(predict, "cond", "uncond", 1.0)(torch.ones(1), torch.tensor(0.5))
    assert calls == ["cond"]
    guided_model(predict, "cond", "uncond", 2.0)(torch.ones(1), torch.tensor(0.5))
    assert calls == ["cond", "cond", "uncond"]


@pytest.mark.parametrize("steps", [4, 8])
def test_lightning_schedule_matches_diffusers(steps):
    """The Lightning LoRAs' scheduler config (base_shift = max_shift = ln 3, shift_terminal None), as
    `--preset lightning` sets it through the family's default_sigmas."""
    import math
    from dataclasses import replace

    import numpy as np

    from flowtuner.families import get_family

    config = {**QWEN_SCHEDULER, "base_shift": math.log(3), "max_shift": math.log(3), "shift_terminal": None}
    sched = FlowMatchEulerDiscreteScheduler(**config)
    sched.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), mu=replace(SHIFT_LINE, base_shift=math.log(3), max_shift=math.log(3)).mu(4096))
    ours = get_family("qwen_image").default_sigmas(steps, 4096, base_shift=math.log(3), max_shift=math.log(3), shift_terminal=0.0)
    assert torch.equal(ours, sched.sigmas)
