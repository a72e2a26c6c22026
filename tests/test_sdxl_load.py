"""SDXL loading: the ldm <-> diffusers key tables (vs diffusers' and ComfyUI's own converters, tiny and real size
on the meta device), the loaders for every layout users have, the single-file writer (read back exactly and by
ComfyUI's own UNet), and detection."""

from __future__ import annotations

import json

import pytest
import torch
from accelerate import init_empty_weights
from safetensors.torch import save_file

from flowtuner.errors import ConfigError, WeightsError
from flowtuner.families.sdxl import configs as C
from flowtuner.families.sdxl import detect as D
from flowtuner.families.sdxl import keys as K
from flowtuner.families.sdxl.checkpoint import save_checkpoint
from flowtuner.families.sdxl.text_models import canonical_clip_state, load_clip, load_text_encoders
from flowtuner.families.sdxl.unet import load_unet
from flowtuner.families.sdxl.vae import load_vae
from tests import sdxl_models as M


@pytest.fixture(scope="module")
def models():
    return M.tiny_sdxl()


@pytest.fixture(scope="module")
def single(models, tmp_path_factory):
    return M.write_single_file(tmp_path_factory.mktemp("sdxl") / "sdxl.safetensors", *models)


def _tables(models):
    unet, vae, clip_l, clip_g = models
    return {
        "unet": (unet.state_dict(), K.unet_table(K.UNetLayout.from_config(unet.config))),
        "vae": (vae.state_dict(), K.vae_table(K.VAELayout.from_config(vae.config))),
        "clip_l": (canonical_clip_state(clip_l), K.clip_l_table()),
        "clip_g": (canonical_clip_state(clip_g), K.clip_g_table(clip_g.config.num_hidden_layers)),
    }


def _equal(a: dict, b: dict):
    assert sorted(a) == sorted(b)
    bad = [k for k in a if a[k].shape != b[k].shape or not torch.equal(a[k], b[k])]
    assert not bad, bad[:5]


def _diffusers_reference(component, ldm, models):
    from diffusers.loaders import single_file_utils as S

    full = {K.PREFIXES[component] + k: v for k, v in ldm.items()}
    unet, vae, _, clip_g = models
    if component == "unet":
        return S.convert_ldm_unet_checkpoint(full, dict(unet.config))
    if component == "vae":
        return S.convert_ldm_vae_checkpoint(full, dict(vae.config))
    if component == "clip_l":
        return S.convert_ldm_clip_checkpoint(full)
    return S.convert_open_clip_checkpoint(clip_g, full, prefix=K.PREFIXES["clip_g"])


@pytest.mark.parametrize("component", ["unet", "vae", "clip_l", "clip_g"])
def test_tables_match_diffusers_converters_both_ways(models, component):
    state, table = _tables(models)[component]
    ldm = K.to_ldm(state, table, component)
    # diffusers' own ldm -> diffusers converter reads our ldm names back to the module's weights ...
    _equal(_diffusers_reference(component, ldm, models), state)
    # ... and so does ours, exactly (the round trip)
    _equal(K.to_diffusers(ldm, table, component), state)


def test_tables_match_comfyui_diffusers_to_ldm(models, comfy):
    """ComfyUI's own diffusers -> ldm converters (UNet map, VAE, OpenCLIP) give the names and values we write."""
    import comfy.diffusers_convert as dc
    import comfy.model_detection as md
    import comfy.utils as cu

    tables = _tables(models)
    state, table = tables["unet"]
    ldm = K.to_ldm(state, table)
    comfy_map = cu.unet_to_diffusers(md.unet_config_from_diffusers_unet(state) or
                                     md.detect_unet_config({K.PREFIXES["unet"] + k: v for k, v in ldm.items()},
                                                           K.PREFIXES["unet"]))
    assert {table.ldm_name(k) for k in state} == set(ldm)
    assert all(comfy_map[k] == table.ldm_name(k) for k in state), [k for k in state if comfy_map[k] != table.ldm_name(k)][:3]
    state, table = tables["vae"]
    _equal(dc.convert_vae_state_dict(dict(state)), K.to_ldm(state, table))
    state, table = tables["clip_g"]
    # as ComfyUI's SDXL.process_clip_state_dict_for_saving calls it: "clip_g." then becomes the checkpoint prefix
    comfy_g = dc.convert_text_enc_state_dict_v20({f"clip_g.transformer.{k}": v for k, v in state.items()}, "clip_g")
    _equal(comfy_g, {f"clip_g.{k}": v for k, v in K.to_ldm(state, table).items()})


def _meta_models():
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    with init_empty_weights():
        return (UNet2DConditionModel.from_config(C.UNET), AutoencoderKL.from_config(C.VAE),
                CLIPTextModel(CLIPTextConfig(**C.CLIP_L)), CLIPTextModelWithProjection(CLIPTextConfig(**C.CLIP_G)))


def test_real_size_tables_on_meta(comfy):
    """The published SDXL base architecture: every diffusers key has one ldm name that maps back, the names equal
    ComfyUI's map for its SDXL config, and ComfyUI detects the written key set as SDXL."""
    import comfy.model_detection as md
    import comfy.supported_models as sm
    import comfy.utils as cu

    meta = _meta_models()
    tables = _tables(meta)
    full = {}
    for component, (state, table) in tables.items():
        ldm = K.to_ldm(state, table, component)
        assert len(ldm) == len(state) - (4 * 32 if component == "clip_g" else 0)  # 6 q/k/v tensors -> 2 per layer
        _equal_keys = {k: v.shape for k, v in K.to_diffusers(ldm, table, component).items()}
        assert _equal_keys == {k: v.shape for k, v in state.items()}
        full.update({K.PREFIXES[component] + k: v for k, v in ldm.items()})
    unet_state, unet = tables["unet"]
    assert len(unet_state) == 1680
    comfy_map = cu.unet_to_diffusers(md.detect_unet_config(full, K.PREFIXES["unet"]))
    assert {k: comfy_map[k] for k in unet_state} == {k: unet.ldm_name(k) for k in unet_state}
    assert type(md.model_config_from_unet(full, K.PREFIXES["unet"])) is sm.SDXL
    # 2513 module tensors; a released SDXL base file adds CLIP-L's position_ids (written too) and OpenCLIP's
    # logit_scale (not written: no text encoder uses it): 2515 keys
    assert len(full) == 2513


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_single_file_loads_exactly(models, tmp_path, dtype):
    path = M.write_single_file(tmp_path / "sdxl.safetensors", *models, dtype=dtype)
    loaded = (load_unet(path), load_vae(path), *load_text_encoders(path))
    for want, got in zip(models, loaded):
        assert next(got.parameters()).dtype == dtype
        _equal({k: v.to(dtype) for k, v in want.state_dict().items()}, got.state_dict())


def _forward_equal(models, loaded):
    unet, vae, clip_l, clip_g = models
    torch.manual_seed(0)
    x, t = torch.randn(1, 4, 16, 16), torch.tensor([500.0])
    ctx = torch.randn(1, 77, M.CLIP_L_HIDDEN + M.CLIP_G_HIDDEN)
    extra = {"text_embeds": torch.randn(1, M.CLIP_G_PROJECTION), "time_ids": torch.tensor([[128.0, 128, 0, 0, 128, 128]])}
    assert torch.equal(unet(x, t, ctx, added_cond_kwargs=extra).sample, loaded[0](x, t, ctx, added_cond_kwargs=extra).sample)
    image = torch.rand(1, 3, 32, 32)
    assert torch.equal(vae.encode(image).latent_dist.mode(), loaded[1].encode(image).latent_dist.mode())
    ids = torch.randint(0, 49407, (2, 77))
    assert torch.equal(clip_l(ids, output_hidden_states=True).hidden_states[-2],
                       loaded[2](ids, output_hidden_states=True).hidden_states[-2])
    assert torch.equal(clip_g(ids).text_embeds, loaded[3](ids).text_embeds)


def test_single_file_and_diffusers_folder_run_the_same(models, single, tmp_path):
    with torch.no_grad():
        _forward_equal(models, (load_unet(single), load_vae(single), *load_text_encoders(single)))
        folder = M.write_diffusers_folder(tmp_path / "pipe", *models)
        _forward_equal(models, (load_unet(folder), load_vae(folder), *load_text_encoders(folder)))
        # a component folder given directly, and the fp16 variant file diffusers repos also carry
        assert load_unet(folder / "unet").config.addition_embed_type == "text_time"
        (folder / "vae" / "diffusion_pytorch_model.safetensors").rename(folder / "vae" / "diffusion_pytorch_model.fp16.safetensors")
        _equal(load_vae(folder).state_dict(), models[1].state_dict())


def test_standalone_files(models, tmp_path):
    unet, vae, clip_l, clip_g = models
    tables = _tables(models)
    ldm_unet = K.to_ldm(*tables["unet"])
    ldm_vae = K.to_ldm(*tables["vae"])
    files = {
        "unet_prefixed": {K.PREFIXES["unet"] + k: v for k, v in ldm_unet.items()},
        "unet_ldm": ldm_unet,
        "unet_diffusers": unet.state_dict(),
        "sdxl_vae": ldm_vae,  # the bare ldm names of stabilityai's sdxl_vae.safetensors
        "clip_l": canonical_clip_state(clip_l),  # ComfyUI models/text_encoders/clip_l.safetensors
        "clip_g": canonical_clip_state(clip_g),
        "clip_g_openclip": K.to_ldm(*tables["clip_g"]),
    }
    paths = {}
    for name, state in files.items():
        paths[name] = tmp_path / f"{name}.safetensors"
        save_file({k: v.contiguous() for k, v in state.items()}, paths[name])
    for name in ("unet_prefixed", "unet_ldm", "unet_diffusers"):
        _equal(load_unet(paths[name]).state_dict(), unet.state_dict())
    _equal(load_vae(paths["sdxl_vae"]).state_dict(), vae.state_dict())
    _equal(load_clip(paths["clip_l"], "clip_l").state_dict(), clip_l.state_dict())
    _equal(load_clip(paths["clip_g"], "clip_g").state_dict(), clip_g.state_dict())
    _equal(load_clip(paths["clip_g_openclip"], "clip_g").state_dict(), clip_g.state_dict())


def test_written_file_is_read_by_comfyui(models, single, comfy):
    """ComfyUI's own UNet (its shape detection + ldm loader) computes what diffusers' computes from the same file,
    and its SDXL CLIP key conversion yields exactly the two text encoders. (ComfyUI only recognises SDXL by its
    real widths, which tests_real_size_tables_on_meta checks; a tiny file goes through the same code with the
    config ComfyUI detects from its shapes.)"""
    import comfy.model_detection as md
    import comfy.supported_models as sm
    import comfy.utils as cu

    unet, _, clip_l, clip_g = models
    sd = cu.load_torch_file(str(single))
    config = md.detect_unet_config(sd, K.PREFIXES["unet"])
    model_config = sm.SDXL(config)
    model = model_config.get_model(sd, K.PREFIXES["unet"])
    model.load_model_weights(sd, K.PREFIXES["unet"])
    torch.manual_seed(0)
    x, t = torch.randn(1, 4, 16, 16), torch.tensor([700.0])
    ctx = torch.randn(1, 77, M.CLIP_L_HIDDEN + M.CLIP_G_HIDDEN)
    pooled, time_ids = torch.randn(1, M.CLIP_G_PROJECTION), torch.tensor([[96.0, 128, 8, 0, 128, 128]])
    y = torch.cat([pooled, unet.add_time_proj(time_ids.flatten()).reshape(1, -1)], dim=1)
    with torch.no_grad():
        want = unet(x, t, ctx, added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids}).sample
        got = model.diffusion_model(x, timesteps=t, context=ctx, y=y)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
    clip = model_config.process_clip_state_dict(dict(sd))
    expected = {f"clip_l.transformer.{k}": v for k, v in canonical_clip_state(clip_l).items()}
    expected |= {f"clip_g.transformer.{k}": v for k, v in canonical_clip_state(clip_g).items()}
    position_ids = clip.pop("clip_l.transformer.text_model.embeddings.position_ids")
    assert torch.equal(position_ids, torch.arange(77).unsqueeze(0))
    _equal(clip, expected)


def test_save_round_trip_and_markers(models, tmp_path):
    path = save_checkpoint(tmp_path / "v.safetensors", *models, metadata={"modelspec.title": "tiny"},
                           markers=("v_pred", "ztsnr"))
    assert D.prediction_hints(path) == ("v_prediction", "zero_terminal_snr")
    assert D.detect(str(path), None) == ("sdxl", f"{path} is an SDXL checkpoint (flags: v_prediction, zero_terminal_snr)")
    _equal(load_unet(path).state_dict(), models[0].state_dict())
    assert not list(tmp_path.glob(".*.tmp"))


def _header_file(path, keys):
    save_file({k: torch.zeros(1) for k in keys}, path)
    return path


def test_detection(single, models, tmp_path):
    assert D.detect(str(single), None)[0] == "sdxl"
    assert D.prediction_hints(single) == ()
    D.check(single)
    folder = M.write_diffusers_folder(tmp_path / "pipe", *models)
    assert D.detect(None, str(folder)) == ("sdxl", f"{folder / 'model_index.json'} names StableDiffusionXLPipeline")
    (folder / "model_index.json").unlink()
    assert D.detect(None, str(folder))[0] == "sdxl"  # from unet/config.json's addition_embed_type
    sd15 = _header_file(tmp_path / "sd15.safetensors", [
        "model.diffusion_model.input_blocks.0.0.weight", "cond_stage_model.transformer.text_model.final_layer_norm.weight",
        "first_stage_model.decoder.conv_in.weight"])
    with pytest.raises(ConfigError, match=r"^\S+sd15.safetensors: SD 1.5 is not supported; use an SDXL checkpoint\.$"):
        D.detect(str(sd15), None)
    qwen = _header_file(tmp_path / "qwen.safetensors", ["txt_norm.weight", "transformer_blocks.0.img_mod.1.weight"])
    assert D.detect(str(qwen), None) == (None, "")
    with pytest.raises(ConfigError, match=r"expected an SDXL checkpoint \(--model_version sdxl\), but this is a Qwen-Image DiT\.$"):
        D.check(qwen)
    with pytest.raises(WeightsError, match=r"expected an SDXL UNet, but this looks like a Qwen-Image DiT\.$"):
        load_unet(qwen)
    assert D.name_hint("/m/my_SDXL_merge.safetensors") == "sdxl" and D.name_hint("/m/qwen.safetensors") is None


def test_refusals(tmp_path, models):
    sd15_unet = {K.PREFIXES["unet"] + k: v for k, v in K.to_ldm(*_tables(models)["unet"]).items()
                 if not k.startswith("label_emb.")}
    save_file({k: v.contiguous() for k, v in sd15_unet.items()}, tmp_path / "sd15_unet.safetensors")
    with pytest.raises(WeightsError, match="an SD 1.x / 2.x UNet .*only SDXL is supported"):
        load_unet(tmp_path / "sd15_unet.safetensors")
    pickled = tmp_path / "model.ckpt"
    pickled.write_bytes(b"\x80\x02}q\x00.")
    with pytest.raises(WeightsError, match="pickled"):
        load_unet(pickled)
    (tmp_path / "bad" / "unet").mkdir(parents=True)
    (tmp_path / "bad" / "unet" / "config.json").write_text(json.dumps({"_class_name": "UNet2DConditionModel"}))
    with pytest.raises(WeightsError, match="no .safetensors file"):
        load_unet(tmp_path / "bad")
