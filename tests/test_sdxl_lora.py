"""SDXL LoRAs in kohya naming (ldm UNet names, lora_te1_ / lora_te2_): the names equal the ones ComfyUI maps for the
real SDXL architecture and kohya's module counts; a LoRA flowtuner writes for the tiny SDXL UNet is consumed whole
by ComfyUI's own loader and by diffusers' (kohya converter + PEFT), both giving our merged weights; text-encoder
modules merge into CLIP-L / bigG as ComfyUI and diffusers apply them."""

from __future__ import annotations

import copy
import logging
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file, save_file

from flowtuner.errors import ConfigError
from flowtuner.families.sdxl import keys as K
from flowtuner.families.sdxl import lora as L
from flowtuner.families.sdxl.family import SDXLFamily
from flowtuner.families.sdxl.text_models import canonical_clip_state
from flowtuner.train.lora import LoRANetwork, LoRAWeights, merge_into, select_modules
from flowtuner.train.lora_formats import read_lora_file, write_lora_file
from tests import sdxl_models as M
from tests.test_sdxl_load import models, single  # noqa: F401  (fixtures)

FAMILY = SDXLFamily()
NAMES = FAMILY.lora_names()
TE_PREFIX = {"clip_l": "text_encoder.", "clip_g": "text_encoder_2."}


def unet_lora(unet, seed=0) -> LoRANetwork:
    """The default targets, a few with their own rank / alpha, non-zero up matrices."""
    torch.manual_seed(seed)
    paths = select_modules(unet, FAMILY.lora_default_targets(unet), [], [])
    shapes = {paths[0]: (2, 1.0), paths[-1]: (6, 3.0)}
    net = LoRANetwork(unet, paths, 4, 8.0, shapes=shapes)
    for module in net.loras.values():
        torch.nn.init.normal_(module.up.weight, std=0.2)
    return net


def text_lora(models, seed=1) -> dict[str, LoRAWeights]:
    """Every CLIP-L and bigG layer's Linears kohya trains, keyed by flowtuner's text-encoder paths."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for name, model in (("clip_l", models[2]), ("clip_g", models[3])):
        for i in range(model.config.num_hidden_layers):
            for m in L.CLIP_LINEARS:
                path = f"text_model.encoder.layers.{i}.{m}"
                linear = model.get_submodule(L.module_path(model, path))
                out[TE_PREFIX[name] + path] = LoRAWeights(torch.randn(3, linear.in_features, generator=gen) * 0.2,
                                                          torch.randn(linear.out_features, 3, generator=gen) * 0.2, 1.5)
    return out


@pytest.fixture(scope="module")
def lora_file(models, tmp_path_factory):
    net = unet_lora(models[0])
    weights = {**net.weights(), **text_lora(models)}
    path = tmp_path_factory.mktemp("lora") / "sdxl_kohya.safetensors"
    write_lora_file(weights, path, "kohya", {"ss_network_module": FAMILY.network_module}, names=NAMES)
    return path, weights


def merged_unet(unet, weights, multiplier=1.0):
    unet = copy.deepcopy(unet)
    merge_into(unet, weights, multiplier)
    return unet


def test_names_are_comfyuis_for_real_sdxl_and_kohyas_counts(comfy):
    """At the published size (meta device): 722 UNet modules + 72 CLIP-L + 192 bigG (kohya's log for SDXL), each
    UNet name the `lora_unet_` + ldm name ComfyUI maps for SDXL's config."""
    from accelerate import init_empty_weights
    from diffusers import UNet2DConditionModel

    import comfy.model_detection as md
    import comfy.utils as cu
    from flowtuner.families.sdxl import configs as C

    with init_empty_weights():
        unet = UNet2DConditionModel.from_config(C.UNET)
    targets = FAMILY.lora_default_targets(unet)
    assert len(targets) == 722
    names = L.kohya_names()
    assert sum(n.startswith("lora_te1_") for n in names.values()) == 72
    assert sum(n.startswith("lora_te2_") for n in names.values()) == 192
    comfy_map = cu.unet_to_diffusers(md.unet_config_from_diffusers_unet(unet.state_dict()))
    want = {p: "lora_unet_" + comfy_map[f"{p}.weight"].removesuffix(".weight").replace(".", "_") for p in targets}
    assert {p: names[p] for p in targets} == want
    assert names["down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"] == \
        "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q"


def test_round_trip_and_other_spellings(models, lora_file, tmp_path):
    path, weights = lora_file
    keys = load_file(str(path))
    assert "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q.lora_down.weight" in keys
    assert "lora_te2_text_model_encoder_layers_2_mlp_fc2.alpha" in keys
    assert not any(k.startswith("lora_unet_down_blocks") for k in keys)
    back = read_lora_file(path, *NAMES)
    assert sorted(back) == sorted(weights)
    for p, w in weights.items():
        assert torch.equal(back[p].down, w.down) and torch.equal(back[p].up, w.up) and back[p].alpha == w.alpha
    # kohya names spelt with the diffusers path (OneTrainer; ComfyUI reads these too) and 1x1-conv shaped matrices
    p = "up_blocks.1.attentions.2.transformer_blocks.1.attn2.to_k"
    w = weights[p]
    other = {f"lora_unet_{p.replace('.', '_')}.lora_down.weight": w.down[:, :, None, None],
             f"lora_unet_{p.replace('.', '_')}.lora_up.weight": w.up[:, :, None, None],
             f"lora_unet_{p.replace('.', '_')}.alpha": torch.tensor(w.alpha)}
    save_file(other, tmp_path / "other.safetensors")
    assert torch.equal(read_lora_file(tmp_path / "other.safetensors", *NAMES)[p].delta(), w.delta())


def test_refusals(models, tmp_path):
    conv = {"lora_unet_input_blocks_1_0_in_layers_2.lora_down.weight": torch.zeros(4, 32, 3, 3),
            "lora_unet_input_blocks_1_0_in_layers_2.lora_up.weight": torch.zeros(32, 4, 1, 1)}
    save_file(conv, tmp_path / "locon.safetensors")
    with pytest.raises(ConfigError, match=r"in_layers_2\.lora_down\.weight is a 3x3 convolution LoRA \(LoCon"):
        read_lora_file(tmp_path / "locon.safetensors", *NAMES)
    weights = unet_lora(models[0]).weights()
    with pytest.raises(ConfigError, match="kohya naming only"):
        write_lora_file(weights, tmp_path / "x.safetensors", "comfyui", names=NAMES)
    assert not (tmp_path / "x.safetensors").exists()


def _comfy_model(single):
    import comfy.model_detection as md
    import comfy.supported_models as sm
    import comfy.utils as cu

    sd = cu.load_torch_file(str(single))
    model_config = sm.SDXL(md.detect_unet_config(sd, K.PREFIXES["unet"]))
    model = model_config.get_model(sd, K.PREFIXES["unet"])
    model.load_model_weights(sd, K.PREFIXES["unet"])
    return model


def _comfy_patched(state: dict, key_map: dict, lora_sd: dict, caplog) -> dict[str, torch.Tensor]:
    """ComfyUI's load_lora on `lora_sd`, every patch applied by its calculate_weight: {model key: patched weight}."""
    import comfy.lora

    with caplog.at_level(logging.WARNING):
        patches = comfy.lora.load_lora(lora_sd, key_map)
    assert not [r.message for r in caplog.records if "lora key not loaded" in r.message]  # every key consumed
    return {key: comfy.lora.calculate_weight([(1.0, adapter, 1.0, None, None)], state[key].clone(), key)
            for key, adapter in patches.items()}


def test_comfyui_loads_the_unet_lora(models, single, lora_file, comfy, caplog):
    import comfy.lora

    path, weights = lora_file
    unet_weights, _ = FAMILY.lora_parts(weights)
    model = _comfy_model(single)
    key_map = comfy.lora.model_lora_keys_unet(model, {})
    lora_sd = {k: v for k, v in load_file(str(path)).items() if k.startswith("lora_unet_")}
    patched = _comfy_patched(model.state_dict(), key_map, lora_sd, caplog)
    assert len(patched) == len(unet_weights)
    unet = models[0]
    ours = K.to_ldm(merged_unet(unet, unet_weights).state_dict(), K.unet_table(K.UNetLayout.from_config(unet.config)))
    for key, value in patched.items():
        torch.testing.assert_close(value, ours[key.removeprefix("diffusion_model.")], atol=1e-6, rtol=1e-5)


def test_comfyui_loads_the_text_encoder_lora(models, lora_file, comfy, caplog):
    import comfy.lora

    path, weights = lora_file
    _, text = FAMILY.lora_parts(weights)
    # ComfyUI's SDXL CLIP state dict: clip_l. / clip_g. + "transformer." + the canonical transformers names
    state = {f"{name}.transformer.{k}": v for name, m in (("clip_l", models[2]), ("clip_g", models[3]))
             for k, v in canonical_clip_state(m).items()}
    key_map = comfy.lora.model_lora_keys_clip(SimpleNamespace(state_dict=lambda: state), {})
    lora_sd = {k: v for k, v in load_file(str(path)).items() if k.startswith("lora_te")}
    patched = _comfy_patched(state, key_map, lora_sd, caplog)
    assert len(patched) == len(text)
    encoder = SimpleNamespace(clip_l=copy.deepcopy(models[2]), clip_g=copy.deepcopy(models[3]))
    FAMILY.merge_text_lora(encoder, text, 1.0, "test")
    ours = {f"{name}.transformer.{k}": v for name in ("clip_l", "clip_g")
            for k, v in canonical_clip_state(getattr(encoder, name)).items()}
    for key, value in patched.items():
        torch.testing.assert_close(value, ours[key], atol=1e-6, rtol=1e-5)


def test_diffusers_loads_the_lora(models, lora_file):
    """StableDiffusionXLPipeline.load_lora_weights (its kohya converter, then PEFT layers) runs the UNet and both
    text encoders as our merged models do."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline

    path, weights = lora_file
    unet_weights, text = FAMILY.lora_parts(weights)
    unet, vae, clip_l, clip_g = (copy.deepcopy(m) for m in models)
    pipe = StableDiffusionXLPipeline(vae=vae, text_encoder=clip_l, text_encoder_2=clip_g, tokenizer=None,
                                     tokenizer_2=None, unet=unet, scheduler=EulerDiscreteScheduler())
    pipe.load_lora_weights(str(path))
    ours_unet = merged_unet(models[0], unet_weights)
    encoder = SimpleNamespace(clip_l=copy.deepcopy(models[2]), clip_g=copy.deepcopy(models[3]))
    FAMILY.merge_text_lora(encoder, text, 1.0, "test")
    torch.manual_seed(0)
    x, t = torch.randn(1, 4, 16, 16), torch.tensor([500.0])
    ctx = torch.randn(1, 77, M.CLIP_L_HIDDEN + M.CLIP_G_HIDDEN)
    extra = {"text_embeds": torch.randn(1, M.CLIP_G_PROJECTION), "time_ids": torch.tensor([[128.0, 128, 0, 0, 128, 128]])}
    ids = torch.randint(0, 49407, (1, 77))
    with torch.no_grad():
        base = models[0](x, t, ctx, added_cond_kwargs=extra).sample
        theirs = pipe.unet(x, t, ctx, added_cond_kwargs=extra).sample
        assert (theirs - base).abs().max() > 1e-2  # the LoRA matters
        torch.testing.assert_close(ours_unet(x, t, ctx, added_cond_kwargs=extra).sample, theirs, atol=1e-5, rtol=1e-4)
        for ours, their in ((encoder.clip_l, pipe.text_encoder), (encoder.clip_g, pipe.text_encoder_2)):
            a = ours(ids, output_hidden_states=True).hidden_states[-2]
            b = their(ids, output_hidden_states=True).hidden_states[-2]
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def _finetune_cfg(single):
    return SimpleNamespace(dit=str(single), vae=None, text_encoder=None, tokenizer=None, model=None, comfyui_dir=None)


def test_finetuned_model_saves_a_checkpoint_comfyui_runs_as_flow(models, single, tmp_path, comfy):
    """The file `flowtuner finetune` saves for a (here: perturbed) flow UNet, run by ComfyUI's UNet with its
    ModelSamplingSD3 node and SDXL's own encode_adm, gives our flow denoiser's velocity; VAE and CLIPs come along."""
    import comfy.model_patcher
    from comfy_extras.nodes_model_advanced import ModelSamplingSD3

    from flowtuner.families.base import Conditioning
    from flowtuner.families.sdxl.denoiser import SDXLDenoiser, parametrisation
    from flowtuner.families.sdxl.text_models import load_text_encoders
    from flowtuner.families.sdxl.vae import load_vae
    from flowtuner.weights import atomic_save_safetensors

    family = SDXLFamily()
    family.prediction_type = "flow"
    trained = merged_unet(models[0], unet_lora(models[0], seed=5).weights())  # stands in for the trained UNet
    state = family.full_state(trained, _finetune_cfg(single))
    path = tmp_path / "finetuned.safetensors"
    atomic_save_safetensors({k: v.detach().cpu() for k, v in state.items()}, path, {})  # what Saver writes
    assert not [k for k in state if k in ("v_pred", "ztsnr")]
    assert torch.equal(load_vae(path).encoder.conv_in.weight, models[1].encoder.conv_in.weight)
    assert torch.equal(load_text_encoders(path)[1].text_projection.weight, models[3].text_projection.weight)

    patcher = comfy.model_patcher.ModelPatcher(_comfy_model(path), torch.device("cpu"), torch.device("cpu"))
    patcher = ModelSamplingSD3().patch(patcher, shift=3.0)[0]
    patcher.patch_model()
    model = patcher.model
    ours = SDXLDenoiser(trained, parametrisation("flow"))  # the module training ended with
    geometry = ours.geometry(128, 128)
    torch.manual_seed(0)
    x = torch.randn(1, 4, 16, 16)
    ctx = torch.randn(1, 77, M.CLIP_L_HIDDEN + M.CLIP_G_HIDDEN)
    pooled = torch.randn(1, M.CLIP_G_PROJECTION)
    cond = Conditioning(ctx, extra={"pooled": pooled, "original_size": torch.tensor([[96, 112]]),
                                    "crop_top_left": torch.tensor([[8, 0]])})
    y = model.encode_adm(pooled_output=pooled, height=96, width=112, crop_h=8, crop_w=0, target_height=128,
                         target_width=128)
    with torch.no_grad():
        for s in (0.95, 0.6, 0.2):
            sigma = torch.tensor([s])
            denoised = model.apply_model(x, sigma, c_crossattn=ctx, y=y)
            theirs = (x - denoised) / s  # CONST: denoised = x - sigma v
            torch.testing.assert_close(ours.predict(x, sigma, cond, geometry), theirs, atol=1e-5, rtol=1e-4)


def test_unet_only_run_saves_the_unet_and_v_models_are_marked(models, tmp_path):
    unet = models[0]
    table = K.unet_table(K.UNetLayout.from_config(unet.config))
    lone = tmp_path / "unet.safetensors"
    save_file({K.PREFIXES["unet"] + k: v.contiguous() for k, v in K.to_ldm(unet.state_dict(), table).items()}, lone)
    state = SDXLFamily().full_state(unet, _finetune_cfg(lone))
    assert all(k.startswith(K.PREFIXES["unet"]) for k in state) and len(state) == len(unet.state_dict())
    family = SDXLFamily()
    family.prediction_type = "v"
    full = M.write_single_file(tmp_path / "full.safetensors", *models)
    assert "v_pred" in family.full_state(unet, _finetune_cfg(full))


def test_save_merged_model_writes_the_checkpoint_layout_and_refuses_text_modules(models, single, lora_file, tmp_path,
                                                                                 capsys):
    """generate --save_merged_model on SDXL: a UNet-only LoRA merges into an ldm single file (VAE and CLIPs beside
    the merged UNet); a LoRA with text-encoder modules is refused in one line (the file would silently lose them)."""
    from flowtuner.cli import main
    from flowtuner.families.sdxl.unet import load_unet

    path, weights = lora_file
    unet_only = tmp_path / "unet_only.safetensors"
    write_lora_file({k: w for k, w in weights.items() if not k.startswith(tuple(TE_PREFIX.values()))}, unet_only,
                    "kohya", {}, names=NAMES)
    base = ["generate", "--model_version", "sdxl", "--dit", str(single), "--prompt", "x"]
    out = tmp_path / "merged.safetensors"
    assert main([*base, "--lora_weight", str(unet_only), "--save_merged_model", str(out)]) == 0
    saved = load_file(out)
    assert any(k.startswith("first_stage_model.") for k in saved) and any(k.startswith("conditioner.embedders.1.") for k in saved)
    expected = merged_unet(models[0], {k: w for k, w in weights.items() if not k.startswith(tuple(TE_PREFIX.values()))})
    got = load_unet(out)
    for name, p in expected.state_dict().items():
        torch.testing.assert_close(got.state_dict()[name], p, atol=1e-6, rtol=1e-5)
    capsys.readouterr()
    assert main([*base, "--lora_weight", str(path), "--save_merged_model", str(tmp_path / "no.safetensors")]) == 2
    err = capsys.readouterr().err.strip()
    assert "text-encoder modules" in err and "\n" not in err and not (tmp_path / "no.safetensors").exists()
