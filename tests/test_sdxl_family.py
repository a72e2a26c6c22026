"""The SDXL family's denoiser and objective: eps / v checkpoints sampled on the flow path equal ComfyUI's
ModelSamplingDiscrete arithmetic (flow/discrete.py) and diffusers' SDXL pipeline with EulerDiscreteScheduler; a flow
UNet equals diffusers' FlowMatchEulerDiscreteScheduler driving it (the UNet fed 1000 sigma); the objectives' targets;
the recipe's shifted logit-normal."""

from __future__ import annotations

import math

import pytest
import torch

from flowtuner.families.base import Conditioning
from flowtuner.families.sdxl.denoiser import SDXLDenoiser, parametrisation
from flowtuner.flow.convention import flow_sigma, ve_sigma
from flowtuner.families.sdxl.family import SHIFT_LINE, SDXLFamily
from flowtuner.flow.discrete import PREDICTIONS, as_sampler_model, discrete, noise_scaling
from flowtuner.flow.samplers import SAMPLERS, VE
from flowtuner.flow.timesteps import TimestepOptions, sample_sigmas
from flowtuner.sampling import Job, sample_job
from flowtuner.train.objective import OBJECTIVES, per_sample_loss
from tests.sdxl_models import CLIP_G_HIDDEN, CLIP_G_PROJECTION, CLIP_L_HIDDEN, tiny_unet

H = W = 64
TOKENS = 77


def loud(unet):
    """Weights scaled up so the UNet's output depends strongly on its inputs (a fresh tiny UNet is nearly constant)."""
    with torch.no_grad():
        for name, p in unet.named_parameters():
            if p.dim() > 1:
                p.mul_(2.0)
    return unet


@pytest.fixture(scope="module")
def unet():
    return loud(tiny_unet(7)).to(torch.float32)


@pytest.fixture(scope="module")
def cond():
    g = torch.Generator().manual_seed(3)
    return Conditioning(torch.randn(1, TOKENS, CLIP_L_HIDDEN + CLIP_G_HIDDEN, generator=g),
                        extra={"pooled": torch.randn(1, CLIP_G_PROJECTION, generator=g)})


def family(prediction: str, zsnr: bool = False) -> SDXLFamily:
    fam = SDXLFamily()
    fam.prediction_type, fam.zsnr = prediction, zsnr
    return fam


def run_flowtuner(unet, cond, prediction, steps=6, seed=5, zsnr=False, **job):
    fam = family(prediction, zsnr)
    den = SDXLDenoiser(unet, parametrisation(prediction, zsnr))
    spec = Job(prompt="p", height=H, width=W, steps=steps, guidance_scale=1.0, seed=seed, **job)
    return sample_job(den, fam, spec, {("p", (), ()): cond})[0][2][:, :, 0]


def added(cond, batch=1):
    ids = torch.tensor([[H, W, 0, 0, H, W]], dtype=torch.float32).expand(batch, 6)
    return {"text_embeds": cond.extra["pooled"].expand(batch, -1), "time_ids": ids}


def unet_call(unet, cond):
    return lambda x, t: unet(x, t.reshape(-1).expand(x.shape[0]), encoder_hidden_states=cond.embeds,
                             added_cond_kwargs=added(cond), return_dict=False)[0]


@pytest.mark.parametrize("prediction,comfy_name", [("eps", "eps"), ("v", "v_prediction")])
def test_discrete_checkpoints_sample_as_comfyui_model_sampling_discrete(unet, cond, prediction, comfy_name):
    """ComfyUI's path: KSampler euler / normal on ModelSamplingDiscrete, in VE space, the UNet fed c_in x and the
    nearest table index; flowtuner samples the same sigmas on the flow path."""
    from flowtuner.flow.schedulers import SCHEDULERS

    ms = discrete()
    sigmas_ve = SCHEDULERS["normal"](ms, 6)
    noise = torch.randn((1, 4, H // 8, W // 8), generator=torch.Generator("cpu").manual_seed(5))
    x = noise_scaling(float(sigmas_ve[0]), noise, torch.zeros_like(noise), max_denoise=True)
    with torch.no_grad():
        ref = SAMPLERS["euler"](as_sampler_model(unet_call(unet, cond), ms, PREDICTIONS[comfy_name]), x, sigmas_ve, noising=VE)
        ours = run_flowtuner(unet, cond, prediction, scheduler="normal")
    assert ref.abs().mean() > 0.3  # the UNet moved the latents
    torch.testing.assert_close(ours, ref, atol=2e-4, rtol=1e-4)


@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_discrete_checkpoints_sample_as_diffusers_sdxl_pipeline(unet, cond, prediction):
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline

    from flowtuner.families.sdxl.family import DIFFUSERS_PREDICTION, EULER_CONFIG

    sched = EulerDiscreteScheduler(**EULER_CONFIG, prediction_type=DIFFUSERS_PREDICTION[prediction])
    pipe = StableDiffusionXLPipeline(vae=None, text_encoder=None, text_encoder_2=None, tokenizer=None, tokenizer_2=None,
                                     unet=unet, scheduler=sched)
    pipe.set_progress_bar_config(disable=True)
    pipe.default_sample_size = H // 8
    with torch.no_grad():
        ref = pipe(prompt_embeds=cond.embeds, pooled_prompt_embeds=cond.extra["pooled"], height=H, width=W,
                   num_inference_steps=6, guidance_scale=1.0, output_type="latent",
                   generator=torch.Generator("cpu").manual_seed(5)).images
        ours = run_flowtuner(unet, cond, prediction)
    torch.testing.assert_close(ours, ref, atol=2e-4, rtol=1e-4)


def test_flow_unet_samples_as_diffusers_flow_match_euler(unet, cond):
    """bigASP v2.5's convention: FlowMatchEulerDiscreteScheduler(shift) drives the UNet with timestep 1000 sigma and
    steps x + (sigma' - sigma) v (diffusers' SDXL pipeline cannot hold this scheduler: no scale_model_input)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    sched = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=6.0)
    sched.set_timesteps(5)
    x = torch.randn((1, 4, H // 8, W // 8), generator=torch.Generator("cpu").manual_seed(9))
    with torch.no_grad():
        for t in sched.timesteps:
            v = unet(x, t.reshape(1), encoder_hidden_states=cond.embeds, added_cond_kwargs=added(cond), return_dict=False)[0]
            x = sched.step(v, t, x, return_dict=False)[0]
        ours = run_flowtuner(unet, cond, "flow", steps=5, seed=9, flow_shift=6.0)
    torch.testing.assert_close(ours, x, atol=2e-4, rtol=1e-4)


class Spy(torch.nn.Module):
    def __init__(self, unet):
        super().__init__()
        self.unet, self.seen = unet, []

    def forward(self, x, t, **kw):
        self.seen.append((x.clone(), t.clone(), kw["added_cond_kwargs"]["time_ids"].clone()))
        return self.unet(x, t, **kw)

    def parameters(self, recurse=True):
        return self.unet.parameters(recurse)


def test_flow_unet_gets_1000_sigma_and_the_flow_state(unet, cond):
    spy = Spy(unet)
    den = SDXLDenoiser(spy, parametrisation("flow"))
    x = torch.randn(2, 4, 8, 8)
    sigma = torch.tensor([0.25, 0.8])
    extra = {**cond.extra, "original_size": torch.tensor([[512, 768], [96, 64]]), "crop_top_left": torch.tensor([[3, 4], [0, 8]])}
    geometry = den.geometry(64, 128)
    den.predict(x, sigma, Conditioning(cond.embeds, extra=extra), geometry)
    x_in, t, ids = spy.seen[-1]
    assert torch.equal(t, torch.tensor([250.0, 800.0])) and torch.equal(x_in, x)
    assert ids.tolist() == [[512, 768, 3, 4, 64, 128], [96, 64, 0, 8, 64, 128]]


def test_eps_unet_gets_the_table_index_and_the_vp_sample(unet, cond):
    spy = Spy(unet)
    den = SDXLDenoiser(spy, parametrisation("eps"))
    table = discrete().table
    index = torch.tensor([10, 500, 999])
    sigma = flow_sigma(table[index].double()).float()
    x = torch.randn(3, 4, 8, 8)
    den.predict(x, sigma, cond, den.geometry(64, 64))
    x_in, t, ids = spy.seen[-1]
    assert t.tolist() == [10.0, 500.0, 999.0]
    scale = (1 / (1 - sigma)) / (1 + ve_sigma(sigma) ** 2).sqrt()  # x_VE = x / (1 - sigma), VP input x_VE / sqrt(1 + s^2)
    torch.testing.assert_close(x_in, x * scale.view(-1, 1, 1, 1))
    assert ids.tolist() == [[64, 64, 0, 0, 64, 64]] * 3


@pytest.mark.parametrize("name", ["flow", "eps", "v"])
def test_objective_targets(name):
    """flow: eps - x0; eps: eps; v: a eps - s x0. An exact model of each gives zero loss; the targets by hand."""
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(3, 4, 2, 2, generator=g), torch.randn(3, 4, 2, 2, generator=g)
    sigma = torch.tensor([0.1, 0.5, 0.9])
    s = sigma.view(-1, 1, 1, 1)
    r = ((1 - s) ** 2 + s**2).sqrt()
    expected = {"flow": noise - x0, "eps": noise, "v": (1 - s) / r * noise - s / r * x0}[name]
    torch.testing.assert_close(OBJECTIVES[name].target(x0, noise, s), expected)
    exact = lambda x_t, sig, c, geo: noise - x0  # noqa: E731
    loss = per_sample_loss(exact, x0, noise, sigma, None, None, OBJECTIVES[name])
    assert loss.max() < 1e-10
    off = lambda x_t, sig, c, geo: noise - x0 + 0.1  # noqa: E731
    # the eps error of a v error d is (1 - sigma) d; the VP-v error d / (a + s) (both exact)
    factor = {"flow": torch.ones(3), "eps": (1 - sigma) ** 2, "v": (1 - sigma) ** 2 + sigma**2}[name]
    torch.testing.assert_close(per_sample_loss(off, x0, noise, sigma, None, None, OBJECTIVES[name]), 0.01 * factor)


def test_discrete_objectives_train_on_table_sigmas():
    drawn = torch.tensor([0.0, 0.0104, 0.5, 0.9999])
    ve = discrete().table.double()
    expected = flow_sigma(ve[torch.tensor([0, 10, 500, 999])]).float()
    torch.testing.assert_close(OBJECTIVES["eps"].sigmas(drawn), expected)
    assert torch.equal(OBJECTIVES["flow"].sigmas(drawn), drawn)
    assert OBJECTIVES["v"].sigmas(drawn, zsnr=True)[-1] > 0.9997  # sigma 4518.76 on the zsnr table


def test_the_default_training_sigmas_are_the_recipes_shifted_logit_normal():
    """sdxl-flow-recipe.md §A1: quantiles 5 % 0.367, 25 % 0.605, median 0.750, 75 % 0.855, 95 % 0.940; the family's
    default sampler (its flat shift line, mu = ln 3), `shift` 3 and `logit_normal` mean ln 3 are one distribution."""
    n = 400_000
    draws = {
        "qwen_shift": sample_sigmas("qwen_shift", n, torch.Generator().manual_seed(1), TimestepOptions(shift_line=SHIFT_LINE), 4096),
        "shift": sample_sigmas("shift", n, torch.Generator().manual_seed(1), TimestepOptions(discrete_flow_shift=3.0), 64),
        "logit_normal": sample_sigmas("logit_normal", n, torch.Generator().manual_seed(1), TimestepOptions(logit_mean=math.log(3)), 64),
    }
    q = torch.tensor([0.05, 0.25, 0.5, 0.75, 0.95])
    for name, sig in draws.items():
        got = torch.quantile(sig[:100_000].double(), q.double())
        torch.testing.assert_close(got, torch.tensor([0.367, 0.605, 0.750, 0.855, 0.940], dtype=torch.float64), atol=4e-3, rtol=0)
    torch.testing.assert_close(draws["qwen_shift"], draws["shift"], atol=1e-6, rtol=0)  # the same draws, sigma(z + ln 3)
    torch.testing.assert_close(draws["shift"], draws["logit_normal"], atol=1e-6, rtol=0)
    assert SDXLFamily.default_timestep_sampling == "qwen_shift"
