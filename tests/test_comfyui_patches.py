"""flowtuner's PAG node on ComfyUI's OWN Qwen-Image DiT (comfy.ldm.qwen_image.model, built in-process by ComfyUI's
model classes with the tiny DiT's dims and loaded with its weights; the key names are ComfyUI's = diffusers').

- the perturbed pass through ComfyUI's patch hooks equals flowtuner's perturbed-attention pass (diffusers' DiT with
  families/qwen_image/pag.py's processor) on the same weights, and the unperturbed passes agree too;
- a KSampler run (comfy.sample.sample: ModelSamplingAuraFlow 3.1, euler / simple, CFG 2.5) with the node equals
  flowtuner's sampling with `--preset comfy-qwen --guidance pag:...` (sample_job, what `flowtuner generate` runs after
  text encoding, given the same embeddings);
- ComfyUI's own PerturbedAttentionGuidance is a no-op on this DiT (why the node exists), ours is not.

Tolerance: 1e-5 + 1e-5 |x| on the DiT outputs (float32, two implementations of the same attention: ~1e-6
measured), 1e-4 on sampled latents (|x| ~ 3).
"""

from __future__ import annotations

import pytest
import torch

from flowtuner.comfyui import patches
from flowtuner.errors import ConfigError
from flowtuner.families.base import Conditioning
from flowtuner.families.qwen_image.family import QwenImageDenoiser, QwenImageFamily
from flowtuner.families.qwen_image.tiny import TEXT_HIDDEN, tiny_dit
from flowtuner.sampling import Job, sample_job

CPU = torch.device("cpu")
H = W = 64  # latents 8 x 8, 16 image tokens
LAYERS = 3
TXT = 7


@pytest.fixture(scope="module")
def dit():
    return tiny_dit(seed=5, layers=LAYERS)


def comfy_patcher(dit):
    """A ModelPatcher around ComfyUI's QwenImage model (its real class) with the tiny DiT's dims and weights."""
    import comfy.model_patcher
    import comfy.supported_models as sm

    config = sm.QwenImage({"image_model": "qwen_image", "in_channels": 64, "num_layers": LAYERS, "attention_head_dim": 128,
                           "num_attention_heads": 1, "joint_attention_dim": TEXT_HIDDEN})
    config.set_inference_dtype(torch.float32, None)
    sd = {k: v.detach().clone() for k, v in dit.state_dict().items()}
    model = config.get_model(sd)
    missing, unexpected = model.diffusion_model.load_state_dict(sd, strict=True)
    assert not missing and not unexpected
    return comfy.model_patcher.ModelPatcher(model, CPU, CPU)


@pytest.fixture(scope="module")
def patcher(comfy, dit):
    return comfy_patcher(dit)


@pytest.fixture(scope="module")
def conds():
    g = torch.Generator().manual_seed(11)
    return {key: Conditioning(torch.randn(1, TXT, TEXT_HIDDEN, generator=g) * 3) for key in (("p", (), ()), ("n", (), ()))}


def comfy_dit_pass(patcher, x5, sigma, context, blocks=None):
    """ComfyUI's Qwen DiT forward, with the perturbed-attention patch in `blocks` (None: plain)."""
    options = {"transformer_options": {}}
    if blocks is not None:
        options = patches.perturbed_options(options, blocks)
    dm = patcher.model.diffusion_model
    with torch.no_grad():
        return dm(x5, torch.tensor([sigma]), context, transformer_options=options["transformer_options"])


@pytest.mark.parametrize("blocks,spec", [([1], "1"), ([0, 2], "0+2")])
def test_perturbed_pass_equals_flowtuners(dit, patcher, conds, blocks, spec):
    from flowtuner.families.qwen_image.family import pack

    den = QwenImageDenoiser(dit)
    geometry = den.geometry(H, W)
    g = torch.Generator().manual_seed(2)
    x5 = torch.randn(1, 16, 1, H // 8, W // 8, generator=g)
    cond = conds[("p", (), ())]
    with torch.no_grad():
        ours_plain = den.predict(pack(x5), torch.tensor(0.7), cond, geometry)
        with den.perturbed_attention(spec):
            ours_pag = den.predict(pack(x5), torch.tensor(0.7), cond, geometry)
    theirs_plain = pack(comfy_dit_pass(patcher, x5, 0.7, cond.embeds))
    theirs_pag = pack(comfy_dit_pass(patcher, x5, 0.7, cond.embeds, blocks))
    tol = dict(atol=1e-5 * float(ours_plain.abs().max()) + 1e-5, rtol=0)
    torch.testing.assert_close(theirs_plain, ours_plain, **tol)  # the two DiTs agree unpatched
    torch.testing.assert_close(theirs_pag, ours_pag, **tol)
    assert (ours_pag - ours_plain).abs().max() > 1e-2 * ours_plain.abs().max()  # the perturbation is visible


def run_comfy(patcher, conds, cfg=2.5, steps=2, seed=4):
    import comfy.sample
    from comfy_extras.nodes_model_advanced import ModelSamplingAuraFlow

    patched = ModelSamplingAuraFlow().patch_aura(patcher, 3.1)[0]
    latent = torch.zeros(1, 16, 1, H // 8, W // 8)
    noise = comfy.sample.prepare_noise(latent, seed)
    out = comfy.sample.sample(patched, noise, steps, cfg, "euler", "simple", [[conds[("p", (), ())].embeds, {}]],
                              [[conds[("n", (), ())].embeds, {}]], latent, seed=seed, disable_pbar=True)
    return patched.model.latent_format.process_in(out)


def run_ours(dit, conds, guidance=None, cfg=2.5, steps=2, seed=4):
    """flowtuner's sampling as `flowtuner generate --preset comfy-qwen [--guidance ...]` sets it."""
    job = Job(prompt="p", negative_prompt="n", height=H, width=W, steps=steps, guidance_scale=cfg, seed=seed,
              sampler="euler", scheduler="simple", model_sampling="aura_flow", shift=3.1, cfg_mode="plain",
              guidance=guidance)
    return sample_job(QwenImageDenoiser(dit), QwenImageFamily(), job, conds)[0][2]


def assert_latents_close(ours, theirs):
    assert theirs.abs().max() > 0.5
    torch.testing.assert_close(theirs, ours, atol=1e-4, rtol=0)


@pytest.fixture(scope="module")
def plain_runs(dit, patcher, conds):
    return run_ours(dit, conds), run_comfy(patcher, conds)


def test_node_sampling_equals_flowtuner_generate_pag(dit, patcher, conds, plain_runs):
    node = patches.NODES["flowtunerQwenPAG"]()
    theirs = run_comfy(node.patch(patcher, 2.0, "1-2")[0], conds)
    ours = run_ours(dit, conds, ["pag:scale=2,blocks=1-2"])
    assert_latents_close(ours, theirs)
    ours_plain, theirs_plain = plain_runs
    assert_latents_close(ours_plain, theirs_plain)  # and without PAG both sides agree as well
    assert (theirs - theirs_plain).abs().max() > 0.05  # the node changes the result


def test_comfyuis_own_pag_node_is_a_no_op_on_qwen(patcher, conds, plain_runs):
    """The motivation: ComfyUI's PerturbedAttentionGuidance replaces a UNet's middle-block attn1, which the
    Qwen DiT never consults, so its extra pass equals the conditional one and D_cfg comes back unchanged."""
    from comfy_extras.nodes_pag import PerturbedAttentionGuidance

    theirs = run_comfy(PerturbedAttentionGuidance.execute(patcher, 3.0)[0], conds)
    # 3 x (D_c - D_pag) is float noise only: D_c came from a cond+uncond batch, D_pag from a cond-only one
    torch.testing.assert_close(theirs, plain_runs[1], atol=1e-5, rtol=0)


def test_scale_zero_and_clone(patcher, conds, plain_runs):
    node = patches.QwenPAG()
    patched = node.patch(patcher, 0.0, "middle")[0]
    assert patched is not patcher and not patcher.model_options.get("sampler_post_cfg_function")
    torch.testing.assert_close(run_comfy(patched, conds), plain_runs[1], atol=1e-6, rtol=0)


def test_chains_an_existing_block_replacement(patcher):
    """Another node's patches_replace["dit"] entry for the same block still runs, inside the perturbed pass."""
    import comfy.model_patcher

    seen = []

    def other(args, extra):
        seen.append(args["transformer_options"].get("optimized_attention_override") is not None)
        return extra["original_block"](args)

    options = comfy.model_patcher.set_model_options_patch_replace({"transformer_options": {}}, other, "dit", "double_block", 1)
    options = patches.perturbed_options(options, [1])
    x5 = torch.randn(1, 16, 1, 4, 4)
    with torch.no_grad():
        patcher.model.diffusion_model(x5, torch.tensor([0.5]), torch.randn(1, 3, TEXT_HIDDEN),
                                      transformer_options=options["transformer_options"])
    assert seen == [True]


def test_bad_inputs_are_one_line_errors(comfy, patcher):
    import comfy.model_patcher

    class NotQwen(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.diffusion_model = torch.nn.Linear(2, 2)

    with pytest.raises(ConfigError, match=r"^flowtuner PAG \(Qwen DiT\): the MODEL is Linear, not a Qwen-Image DiT"):
        patches.QwenPAG().patch(comfy.model_patcher.ModelPatcher(NotQwen(), CPU, CPU), 3.0, "middle")
    with pytest.raises(ConfigError, match=r"blocks='7'.*blocks 0-2\.$") as err:
        patches.QwenPAG().patch(patcher, 3.0, "7")
    assert "\n" not in str(err.value)
    with pytest.raises(ConfigError, match="mask"):
        patches.identity_image_attention(None, *(torch.zeros(1, 4, 8),) * 3, 1, torch.ones(1, 4), txt_len=2)


def test_node_is_registered():
    import flowtuner.comfyui as pack

    assert "patches" not in pack.FAILED and pack.NODE_CLASS_MAPPINGS["flowtunerQwenPAG"] is patches.QwenPAG
    spec = patches.QwenPAG.INPUT_TYPES()["required"]
    assert spec["model"] == ("MODEL",) and spec["blocks"][1]["default"] == "middle"
    assert patches.DISPLAY["flowtunerQwenPAG"] == "flowtuner PAG (Qwen DiT)"
