"""Model loaders on synthetic files with the real key names: fp8 variants, all-in-one checkpoints,
tokenizer lookup, path resolution."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from flowtuner.errors import FlowtunerError
from flowtuner.families.paths import resolve_paths
from flowtuner.families.qwen_image.dit import load_dit
from flowtuner.families.qwen_image.family import QwenImageDenoiser, set_attention
from flowtuner.families.qwen_image.text_encoder import load_text_model
from flowtuner.families.qwen_image.tokenizer import load_tokenizer
from flowtuner.families.qwen_image.vae import load_vae
from tests.layouts import legacy_te_key, state


def _velocity(dit, seed=0):
    den = QwenImageDenoiser(dit)
    g = den.geometry(64, 64)
    x = den.noise(g, seed)
    from flowtuner.families.base import Conditioning

    cond = Conditioning(torch.randn(1, 5, 128, generator=torch.Generator().manual_seed(seed)))
    return den.predict(x, torch.tensor(0.7), cond, g)


def test_dit_layouts_load_identical_weights(tiny_models, tiny_files):
    ref = state(tiny_models["dit"])
    for path in (tiny_files["repo"] / "transformer",
                 tiny_files["comfy"] / "models/diffusion_models/qwen_image_tiny_prefixed.safetensors"):
        dit, info = load_dit(path)
        assert all(torch.equal(v, ref[k]) for k, v in dit.state_dict().items())


def test_fp8_scaled_dit_dequantised(tiny_models, tmp_path):
    ref = state(tiny_models["dit"])
    plain, scaled = {}, {"scaled_fp8": torch.empty(0, dtype=torch.float8_e4m3fn)}
    for k, v in ref.items():
        if v.ndim == 2:  # linear weights are quantised, as in ComfyUI's files
            s = v.abs().max() / 448.0
            scaled[k], scaled[k[: -len("weight")] + "scale_weight"] = (v / s).to(torch.float8_e4m3fn), s.reshape(1)
            plain[k] = v.to(torch.float8_e4m3fn)
        else:
            scaled[k] = plain[k] = v.to(torch.bfloat16)
    save_file({f"model.diffusion_model.{k}": v for k, v in scaled.items()}, tmp_path / "scaled.safetensors")
    save_file(plain, tmp_path / "plain.safetensors")
    dit_scaled, info = load_dit(tmp_path / "scaled.safetensors")
    dit_plain, _ = load_dit(tmp_path / "plain.safetensors")
    assert info.dtype == torch.bfloat16 and dit_scaled.dtype == torch.bfloat16
    v_ref = _velocity(tiny_models["dit"])
    v_scaled = _velocity(dit_scaled.float())
    rel = (v_scaled - v_ref).norm() / v_ref.norm()
    assert rel < 0.1, rel  # fp8 rounding only
    # the same file loaded while ignoring scale_weight (as diffusers does) is far off
    naive = {k: v.to(torch.float32) for k, v in scaled.items() if not k.endswith("scale_weight") and k != "scaled_fp8"}
    dit_naive = tiny_models["dit"].__class__.from_config(tiny_models["dit"].config)
    dit_naive.load_state_dict(naive)
    naive_rel = (_velocity(dit_naive) - v_ref).norm() / v_ref.norm()
    assert not naive_rel <= 3 * rel  # NaN (overflow) or far off
    assert (_velocity(dit_plain.float()) - v_ref).norm() / v_ref.norm() < 0.1


def test_all_in_one_comfyui_checkpoint(tiny_models, tmp_path):
    sd = {f"model.diffusion_model.{k}": v for k, v in state(tiny_models["dit"]).items()}
    sd.update({f"vae.{k}": v for k, v in state(tiny_models["vae"]).items()})
    sd.update({f"text_encoders.qwen25_7b.transformer.{legacy_te_key(k)}": v
               for k, v in state(tiny_models["te"]).items() if legacy_te_key(k)})
    path = tmp_path / "qwen_image_all.safetensors"
    save_file(sd, path)
    dit, _ = load_dit(path)
    vae = load_vae(path)
    te = load_text_model(path)
    assert torch.equal(dit.img_in.weight, tiny_models["dit"].img_in.weight)
    assert torch.equal(vae.decoder.conv_in.weight, tiny_models["vae"].decoder.conv_in.weight)
    assert torch.equal(te.norm.weight, tiny_models["te"].model.language_model.norm.weight)


def test_wan_vae_layout_loads_identical_weights(tiny_models, tiny_files):
    vae = load_vae(tiny_files["comfy"] / "models/vae/qwen_image_vae_tiny.safetensors")
    ref = state(tiny_models["vae"])
    assert vae.config.dim_mult == [1, 2, 4, 4]
    assert all(torch.equal(v, ref[k]) for k, v in vae.state_dict().items())


def test_tokenizer_lookup_order_and_error(tiny_files, tmp_path, monkeypatch):
    monkeypatch.delenv("COMFYUI_PATH", raising=False)
    tok = load_tokenizer(near=[tiny_files["repo"] / "text_encoder"])  # repo root's tokenizer/
    assert tok.convert_tokens_to_ids("<|im_start|>") == 151644
    comfy = tmp_path / "ComfyUI"
    (comfy / "comfy" / "text_encoders").mkdir(parents=True)
    (comfy / "comfy" / "text_encoders" / "qwen25_tokenizer").symlink_to(tiny_files["tokenizer"])
    monkeypatch.setenv("COMFYUI_PATH", str(comfy))
    assert load_tokenizer(near=[tmp_path / "lonely.safetensors"]) is not None
    monkeypatch.delenv("COMFYUI_PATH")
    with pytest.raises(FlowtunerError) as err:
        load_tokenizer(near=[tmp_path / "lonely.safetensors"])
    msg = str(err.value)
    assert "no Qwen2.5 tokenizer found" in msg and str(tmp_path / "tokenizer") in msg and "HF_HUB_OFFLINE" in msg


def test_paths_from_repo_root_and_comfyui(tiny_files):
    repo = resolve_paths(model=tiny_files["repo"])
    assert repo.dit.name == "transformer" and repo.vae.name == "vae" and repo.text_encoder.name == "text_encoder"
    comfy = resolve_paths(comfyui_dir=tiny_files["comfy"], dit="qwen_image_tiny.safetensors",
                          vae="qwen_image_vae_tiny.safetensors", text_encoder="qwen_2.5_vl_tiny.safetensors")
    assert comfy.dit.parent.name == "diffusion_models" and comfy.vae.parent.name == "vae"
    with pytest.raises(FlowtunerError, match="not found"):
        resolve_paths(comfyui_dir=tiny_files["comfy"], dit="nope.safetensors")


def test_missing_attention_package_is_an_error(tiny_models):
    import importlib.util

    for mode, package in (("flash", "flash_attn"), ("sage", "sageattention"), ("xformers", "xformers")):
        if importlib.util.find_spec(package) is None:
            with pytest.raises(FlowtunerError, match=f"needs the '{package}' package"):
                set_attention(tiny_models["dit"], mode)


def test_text_encoder_hf_folder_in_legacy_layout(tiny_models, tiny_files, tmp_path):
    """An HF folder whose safetensors use the pre-4.52 key names, with its config.json."""
    import shutil

    folder = tmp_path / "te_legacy"
    folder.mkdir()
    shutil.copy(tiny_files["repo"] / "text_encoder" / "config.json", folder / "config.json")
    save_file({legacy_te_key(k): v for k, v in state(tiny_models["te"]).items() if legacy_te_key(k)},
              folder / "model.safetensors")
    te = load_text_model(folder)
    ref = tiny_models["te"].model.language_model.state_dict()
    assert all(torch.equal(v, ref[k]) for k, v in te.state_dict().items())


def test_text_encoder_cpu_flag_runs_encoder_on_cpu(tiny_files, tmp_path, monkeypatch):
    from flowtuner import generate
    from flowtuner.cli import main

    seen = {}
    original = generate.encode_prompts
    monkeypatch.setattr(generate, "encode_prompts",
                        lambda fam, paths, jobs, device, *a: seen.setdefault("te", device) and original(fam, paths, jobs, device, *a))
    monkeypatch.setattr(generate, "sample_all", lambda fam, paths, jobs, conds, device, *a: seen.setdefault("dit", device) and [])
    args = ["generate", "--model", str(tiny_files["repo"]), "--prompt", "x", "--image_size", "32", "32",
            "--save_path", str(tmp_path), "--output_type", "latent", "--device", "meta"]
    assert main(args + ["--text_encoder_cpu"]) == 0
    assert seen == {"te": torch.device("cpu"), "dit": torch.device("meta")}
