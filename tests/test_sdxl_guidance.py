"""SDXL inference against ComfyUI's own code on ComfyUI's own UNet (built by its loader from our tiny single file):
every sampler in ComfyUI's VE space for eps / v checkpoints, PAG (node and other attn1 blocks), FreeU / FreeU_V2,
and `--preset bigasp` (ModelSamplingSD3 shift 6, euler / normal, CFG 5) on a flow UNet. Latents are compared after
whole KSampler runs; ComfyUI's output is process_latent_out'ed, so it is scaled back by 0.13025.

Tolerance: 2e-3 + 2e-5 x max|latent|. ComfyUI's UNet and diffusers' differ by float rounding (~1e-6 per forward);
the loud tiny UNet amplifies that over a run to <= 7e-4 on latents of magnitude 4-80 (measured), while what the tests
guard against (flow-space multistep updates, a missing patch) moves latents by 0.1-10. 6 steps: with 5, "normal" puts a sigma at table time 499.5, halfway
between two table sigmas in log space, where float rounding alone picks the UNet's timestep on either side."""

from __future__ import annotations

import contextlib

import pytest
import torch

from flowtuner.errors import ConfigError
from flowtuner.families.base import Conditioning
from flowtuner.families.sdxl import keys as K
from flowtuner.families.sdxl.denoiser import SDXLDenoiser, parametrisation
from flowtuner.families.sdxl.family import SDXLFamily
from flowtuner.sampling import Job, sample_job
from tests import sdxl_models as M

H = W = 64
CPU = torch.device("cpu")


def loud(unet):
    """Weights x 2 so the tiny UNet's output depends strongly on its input (as tests/test_sdxl_family.py)."""
    with torch.no_grad():
        for p in unet.parameters():
            if p.dim() > 1:
                p.mul_(2.0)
    return unet


@pytest.fixture(scope="module")
def unet():
    return loud(M.tiny_unet(7)).to(torch.float32)


@pytest.fixture(scope="module")
def comfy_sd(unet, tmp_path_factory, comfy):
    import comfy.utils as cu

    _, vae, clip_l, clip_g = M.tiny_sdxl()
    path = M.write_single_file(tmp_path_factory.mktemp("sdxl") / "tiny.safetensors", unet, vae, clip_l, clip_g)
    return cu.load_torch_file(str(path))


def comfy_patcher(sd):
    """A fresh ModelPatcher around ComfyUI's SDXL model loaded from the file (EPS, as ComfyUI reads any SDXL file)."""
    import comfy.model_detection as md
    import comfy.model_patcher
    import comfy.supported_models as sm

    sd = dict(sd)  # ComfyUI's loader pops what it loads
    model = sm.SDXL(md.detect_unet_config(sd, K.PREFIXES["unet"])).get_model(sd, K.PREFIXES["unet"])
    model.load_model_weights(sd, K.PREFIXES["unet"])
    return comfy.model_patcher.ModelPatcher(model, CPU, CPU)


@pytest.fixture(scope="module")
def conds():
    g = torch.Generator().manual_seed(3)
    embeds = torch.randn(2, 77, M.CLIP_L_HIDDEN + M.CLIP_G_HIDDEN, generator=g)
    pooled = torch.randn(2, M.CLIP_G_PROJECTION, generator=g)
    return {("p", (), ()): Conditioning(embeds[:1], extra={"pooled": pooled[:1]}),
            ("n", (), ()): Conditioning(embeds[1:], extra={"pooled": pooled[1:]})}


def comfy_cond(c: Conditioning, size: tuple[int, int] = (H, W)) -> list:
    h, w = size
    return [[c.embeds, {"pooled_output": c.extra["pooled"], "width": w, "height": h, "target_width": w, "target_height": h}]]


def run_comfy(patcher, conds, sampler="euler", scheduler="normal", cfg=3.0, steps=6, seed=5, size=(H, W)):
    import comfy.sample

    latent = torch.zeros(1, 4, size[0] // 8, size[1] // 8)
    noise = comfy.sample.prepare_noise(latent, seed)
    out = comfy.sample.sample(patcher, noise, steps, cfg, sampler, scheduler, comfy_cond(conds[("p", (), ())], size),
                              comfy_cond(conds[("n", (), ())], size), latent, seed=seed, disable_pbar=True)
    return patcher.model.latent_format.process_in(out)


def run_ours(unet, conds, prediction="eps", sampler="euler", scheduler="normal", cfg=3.0, steps=6, seed=5, size=(H, W), **job):
    fam = SDXLFamily()
    fam.prediction_type = prediction
    den = SDXLDenoiser(unet, parametrisation(prediction))
    spec = Job(prompt="p", negative_prompt="n", height=size[0], width=size[1], steps=steps, guidance_scale=cfg, seed=seed,
               sampler=sampler, scheduler=scheduler, cfg_mode="plain", **job)
    return sample_job(den, fam, spec, conds)[0][2][:, :, 0]


def assert_close(ours, ref):
    assert ref.abs().max() > 1.0  # the UNet moved the latents
    torch.testing.assert_close(ours, ref, atol=2e-5 * float(ref.abs().max()) + 2e-3, rtol=0)


# ------------------------------------------------------------------------------------------------ samplers, VE space
@contextlib.contextmanager
def spaces_as_flow():
    """Every model sampling integrated on the flow path (what flowtuner did before the VE seam)."""
    from flowtuner import sampling

    saved = dict(sampling.SPACES)
    sampling.SPACES.clear()
    try:
        yield
    finally:
        sampling.SPACES.update(saved)


@pytest.mark.parametrize("prediction,sampler,scheduler", [
    ("eps", "heun", "normal"), ("eps", "dpmpp_2m", "karras"), ("eps", "euler_ancestral", "normal"),
    ("v", "dpmpp_2m", "normal"), ("v", "res_multistep", "simple"),
])
def test_discrete_checkpoints_sample_as_comfyui_ksampler(unet, conds, comfy_sd, prediction, sampler, scheduler):
    """ComfyUI samples eps / v models in VE space; there multistep and ancestral updates differ from flow coordinates,
    so these match only because sampling.py runs the samplers in VE space. euler_ancestral draws ComfyUI's noise:
    a CPU generator seeded with the seed, one randn per step."""
    from comfy_extras.nodes_model_advanced import ModelSamplingDiscrete

    patcher = comfy_patcher(comfy_sd)
    if prediction == "v":
        patcher = ModelSamplingDiscrete().patch(patcher, "v_prediction", False)[0]
    steps = 4 if prediction == "v" else 6  # the v model is the more chaotic: UNet rounding grows faster over steps
    ref = run_comfy(patcher, conds, sampler, scheduler, steps=steps)
    assert_close(run_ours(unet, conds, prediction, sampler, scheduler, steps=steps), ref)
    with spaces_as_flow():
        flow = run_ours(unet, conds, prediction, sampler, scheduler, steps=steps)
        assert (flow - ref).abs().max() > 0.05  # flow coordinates differ


# ------------------------------------------------------------------------------------------------ PAG
def test_pag_matches_comfyui_node(unet, conds, comfy_sd):
    from comfy_extras.nodes_pag import PerturbedAttentionGuidance

    patcher = PerturbedAttentionGuidance.execute(comfy_patcher(comfy_sd), 2.0)[0]
    ref = run_comfy(patcher, conds, "dpmpp_2m")
    assert_close(run_ours(unet, conds, sampler="dpmpp_2m", guidance=["pag:scale=2"]), ref)
    plain = run_ours(unet, conds, sampler="dpmpp_2m")
    assert (plain - ref).abs().max() > 0.1  # PAG changed the result


@pytest.mark.parametrize("blocks,comfy_key", [("output.1", ("output", 1)), ("input.8.1", ("input", 8, 1)),
                                              ("middle.0.1+output.0", None)])
def test_perturbed_blocks_are_comfyuis_attn1_keys(unet, conds, comfy_sd, blocks, comfy_key):
    """Our block names are the keys of ComfyUI's attn1 patches: identity attention there everywhere in a run."""
    patcher = comfy_patcher(comfy_sd)
    keys = [comfy_key] if comfy_key else [("middle", 0, 1), ("output", 0)]
    for key in keys:
        patcher.set_model_attn1_replace(lambda q, k, v, extra_options, mask=None: v, key[0], key[1], *key[2:])
    ref = run_comfy(patcher, conds, cfg=1.0)
    den = SDXLDenoiser(unet, parametrisation("eps"))
    with den.perturbed_attention(blocks):
        ours = run_ours(unet, conds, cfg=1.0)
    assert_close(ours, ref)
    assert (run_ours(unet, conds, cfg=1.0) - ref).abs().max() > 0.05  # the blocks changed the result


def test_block_names_on_the_real_sdxl_unet():
    from accelerate import init_empty_weights
    from diffusers import UNet2DConditionModel

    from flowtuner.families.sdxl.configs import UNET
    from flowtuner.families.sdxl.patches import attention_sites, parse_blocks

    with init_empty_weights():
        real = UNet2DConditionModel(**UNET)
    assert list(attention_sites(real)) == ["input.4", "input.5", "input.7", "input.8", "middle.0",
                                           *(f"output.{i}" for i in range(6))]
    assert len(parse_blocks("middle", real)) == 10  # ComfyUI's ("middle", 0): every transformer block there
    assert len(parse_blocks("output.0.3+input.4", real)) == 3
    for bad, says in (("output.9", "this UNet has input.4"), ("middle.0.10", "transformer blocks 0-9"), ("up", "no attention")):
        with pytest.raises(ConfigError, match=says):
            parse_blocks(bad, real)


# ------------------------------------------------------------------------------------------------ FreeU
@pytest.mark.parametrize("variant,params", [("freeu", (1.1, 1.2, 0.9, 0.2)), ("freeu_v2", (1.3, 1.4, 0.9, 0.2)),
                                            ("freeu", (1.5, 0.6, 0.3, 1.7))])
def test_freeu_matches_comfyui_nodes(unet, conds, comfy_sd, variant, params):
    from comfy_extras.nodes_freelunch import FreeU, FreeU_V2

    node = {"freeu": FreeU, "freeu_v2": FreeU_V2}[variant]()
    patcher = node.patch(comfy_patcher(comfy_sd), *params)[0]
    ref = run_comfy(patcher, conds, "heun", steps=4)
    spec = ",".join(f"{k}={v}" for k, v in zip(("b1", "b2", "s1", "s2"), params))
    assert_close(run_ours(unet, conds, sampler="heun", steps=4, guidance=[f"{variant}:{spec}"]), ref)
    assert (run_ours(unet, conds, sampler="heun", steps=4) - ref).abs().max() > 0.05  # FreeU changed the result


def test_freeu_hooks_are_removed_after_the_run(unet, conds):
    before = run_ours(unet, conds, steps=2)
    run_ours(unet, conds, steps=2, guidance=["freeu"])
    assert torch.equal(run_ours(unet, conds, steps=2), before)


def test_freeu_refused_without_a_unet():
    from flowtuner.families.qwen_image.family import QwenImageDenoiser

    qwen = QwenImageDenoiser.__new__(QwenImageDenoiser)  # no DiT needed to refuse
    with pytest.raises(ConfigError, match=r"^--guidance freeu_v2: a UNet patch .* QwenImageDenoiser has no UNet\. Drop it "):
        qwen.model_patch("freeu_v2", {})


# ------------------------------------------------------------------------------------------------ --preset bigasp
def test_bigasp_preset_runs_as_comfyui_model_sampling_sd3(unet, conds, comfy_sd):
    """The model card's graph: ModelSamplingSD3(6) on a flow SDXL (the UNet fed 1000 sigma), KSampler euler / normal,
    CFG 5, against `--preset bigasp`'s settings."""
    from comfy_extras.nodes_model_advanced import ModelSamplingSD3

    from flowtuner.config.sampling import PRESETS

    preset = dict(PRESETS["bigasp"])
    assert preset.pop("model_version") == "sdxl" and preset.pop("negative_prompt") == "low quality"
    prediction, cfg = preset.pop("prediction_type"), preset.pop("guidance_scale")
    assert preset.pop("cfg_mode") == "plain"  # run_ours' own
    patcher = ModelSamplingSD3().patch(comfy_patcher(comfy_sd), 6.0)[0]
    ref = run_comfy(patcher, conds, "euler", "normal", cfg=5.0)
    assert_close(run_ours(unet, conds, prediction, cfg=cfg, **preset), ref)


@pytest.mark.parametrize("scheduler", ["normal", "simple", "beta"])
def test_sd3_shift_sigmas_are_comfyuis(comfy, scheduler):
    import comfy.samplers
    from comfy_extras.nodes_model_advanced import ModelSamplingSD3

    from flowtuner.sampling import schedule

    fam = SDXLFamily()
    fam.prediction_type = "flow"
    patcher = ModelSamplingSD3().patch(comfy_patcher_stub(), 6.0)[0]
    ref = comfy.samplers.calculate_sigmas(patcher.get_model_object("model_sampling"), scheduler, 12)
    cfg = Job(prompt="p", height=H, width=W, steps=12, guidance_scale=1.0, seed=0, scheduler=scheduler,
              model_sampling="sd3", shift=6.0)
    torch.testing.assert_close(schedule(fam, cfg, 12, H, W, 64).sigmas, ref, atol=2e-6, rtol=0)


def comfy_patcher_stub():
    import comfy.model_patcher

    class Net(torch.nn.Module):
        model_config = None

    return comfy.model_patcher.ModelPatcher(Net(), CPU, CPU)


def test_bigasp_preset_on_the_command_line():
    """`--preset bigasp` fills the flags; an explicit flag wins; generate --help lists it."""
    import argparse

    from flowtuner.cli.generate import apply_preset
    from flowtuner.config.fields import add_arguments
    from flowtuner.config.generate import GenerateConfig
    from flowtuner.config.sampling import describe_sampling

    assert "bigasp" in describe_sampling()
    parser = argparse.ArgumentParser()
    add_arguments(parser, GenerateConfig)
    argv = ["--preset", "bigasp", "--guidance_scale", "4"]
    args = parser.parse_args(argv)
    args.subcommand_argv = argv
    args = apply_preset(args, parser)
    assert (args.guidance_scale, args.shift, args.scheduler, args.model_sampling, args.prediction_type, args.sampler,
            args.negative_prompt, args.model_version) == (4.0, 6.0, "normal", "sd3", "flow", "euler", "low quality", "sdxl")
