"""The pack's text-encode, sampler and LoRA nodes in-process (the vendored ComfyUI imported by the `comfy` fixture):
their output equals `flowtuner generate`'s on the tiny model files (text embeddings bit for bit; latents to float
rounding of ComfyUI's raw <-> normalised latent format), ComfyUI's own Qwen model takes the CONDITIONING, and bad
inputs fail in one line. The same workflows through a real ComfyUI server: tests/test_comfyui_workflows.py."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from flowtuner.cli import main
from flowtuner.errors import ConfigError
from tests.datasets import good_dataset
from tests.test_edit_dit import small_area  # noqa: F401  (fixture)
from tests.test_edit_generate import edit_files  # noqa: F401  (fixture)

PROMPT, NEGATIVE = "a red circle on a blue square", "blurry"
EDIT_PROMPT = "make the circle red"
# float32 rounding of raw = z * std + mean and back: |z| ~ 3, std up to 3.3 -> a few 1e-7
LATENT_TOL = dict(atol=2e-6, rtol=0)


# ------------------------------------------------------------------ helpers
def comfy_image(path) -> torch.Tensor:
    """An IMAGE as ComfyUI's LoadImage gives it: [1, H, W, 3] = bytes / 255."""
    array = np.asarray(Image.open(path).convert("RGB")).astype(np.float32) / 255.0
    return torch.from_numpy(array)[None]


def empty_latent(height: int, width: int, batch: int = 1) -> dict:
    """EmptySD3LatentImage's output."""
    return {"samples": torch.zeros(batch, 16, height // 8, width // 8)}


def generate(out, *args, steps: int = 3) -> torch.Tensor:
    argv = ["generate", *map(str, args), "--infer_steps", str(steps), "--save_path", str(out), "--device", "cpu",
            "--output_type", "latent"]
    assert main(argv) == 0
    return torch.cat([load_file(f)["latent"] for f in sorted(out.glob("*_latent.safetensors"))])


def models(version: str, root, comfy):
    """The loaders' objects (FLOWTUNER_MODEL, FLOWTUNER_TEXT_ENCODER, VAE) for a repo, as the CLI resolves --model."""
    from flowtuner.comfyui.loaders import FlowtunerModel, FlowtunerTextEncoder, make_vae
    from flowtuner.comfyui.text import family_of

    family = family_of(version)
    paths = family.resolve_paths(model=str(root))
    return (FlowtunerModel(family, version, paths), FlowtunerTextEncoder(paths, f"{root}:{version}"),
            make_vae(family.load_codec(paths, "cpu"), str(root)), family, paths)


def node(name: str):
    from flowtuner.comfyui import sampler, text

    return {**text.NODES, **sampler.NODES}[name]()


def encode(te, prompt, version="original", vae=None, images=()):
    kwargs = {f"image{i + 1}": im for i, im in enumerate(images)}
    return node("flowtunerTextEncode").run(te, prompt, version, vae, **kwargs)[0]


def run_sampler(model, positive, negative, latent, **kw):
    settings = dict(seed=5, steps=3, cfg=4.0, sampler="euler", scheduler="reference", cfg_mode="norm_rescale", denoise=1.0)
    settings.update(kw)
    return node("flowtunerSampler").run(model, positive, latent, negative=negative, **settings)[0]


def normalised(latent: dict) -> torch.Tensor:
    from flowtuner.comfyui.text import from_comfy_latent

    return from_comfy_latent(latent["samples"])


# ------------------------------------------------------------------ text encode
def test_t2i_embeddings_are_generates_bit_for_bit(comfy, tiny_files):
    from flowtuner import conditioning

    model, te, _, family, paths = models("original", tiny_files["repo"], comfy)
    [[embeds, extra]] = encode(te, PROMPT)
    expected = conditioning.encode(family.load_text_encoder(paths, torch.device("cpu")), [(PROMPT, (), ())], family)
    assert torch.equal(embeds, expected[(PROMPT, (), ())].embeds)
    assert extra == {"pooled_output": None}  # one prompt: no padding, so no mask (ComfyUI drops all-ones masks too)


@pytest.mark.parametrize("version,names", [("edit", "a"), ("edit-2509", "a"), ("edit-2509", "ca"), ("edit-2511", "b"),
                                           ("edit-2511", "ab")])
def test_edit_embeddings_and_references_are_generates(comfy, small_area, edit_files, version, names):
    """Templates, VL sizes, vision tokens and the VAE references, from IMAGE tensors as LoadImage makes them."""
    from flowtuner import conditioning
    from flowtuner.comfyui.text import FLOWTUNER_REFERENCES, REFERENCE_KEY, from_comfy_latent
    from flowtuner.families.qwen_image.edit import REFERENCE_LATENTS

    model, te, vae, family, paths = models(version, edit_files["repos"][version], comfy)
    files = tuple(str(edit_files["images"][n]) for n in names)
    [[embeds, extra]] = encode(te, EDIT_PROMPT, version, vae, [comfy_image(f) for f in files])
    key = (EDIT_PROMPT, files, ())
    expected = conditioning.encode(family.load_text_encoder(paths, torch.device("cpu")), [key], family)
    expected = conditioning.with_controls(family, expected, vae.codec)[key]
    assert torch.equal(embeds, expected.embeds)
    refs = expected.extra[REFERENCE_LATENTS]
    ours = [n for _, n in extra[FLOWTUNER_REFERENCES]]
    assert len(ours) == len(refs) == len(files) and all(torch.equal(a, b) for a, b in zip(ours, refs))
    assert len(extra[REFERENCE_KEY]) == len(files)
    for raw, ref in zip(extra[REFERENCE_KEY], refs):  # ComfyUI's format: raw latents [1, 16, 1, h, w]
        assert raw.shape == ref.shape and raw.dim() == 5
        torch.testing.assert_close(from_comfy_latent(raw), ref, **LATENT_TOL)


def test_bad_images_fail_in_one_line(comfy, edit_files, tiny_files):
    _, te, vae, _, _ = models("edit-2509", edit_files["repos"]["edit-2509"], comfy)
    rgba = torch.rand(1, 32, 32, 4)
    with pytest.raises(ConfigError, match=r"^image1 has an alpha channel \(4 channels\): .*\.$"):
        encode(te, EDIT_PROMPT, "edit-2509", vae, [rgba])
    with pytest.raises(ConfigError, match="a batch of 2 images"):
        encode(te, EDIT_PROMPT, "edit-2509", vae, [torch.rand(2, 32, 32, 3)])
    with pytest.raises(ConfigError, match="connect image1"):
        encode(te, EDIT_PROMPT, "edit-2509", vae)
    with pytest.raises(ConfigError, match="takes exactly 1 control image, got 2"):
        encode(te, EDIT_PROMPT, "edit", vae, [torch.rand(1, 32, 32, 3)] * 2)
    _, te_t2i, _, _, _ = models("original", tiny_files["repo"], comfy)
    with pytest.raises(ConfigError, match="model_version is original"):
        encode(te_t2i, PROMPT, "original", None, [torch.rand(1, 32, 32, 3)])


# ------------------------------------------------------------------ sampler
def test_t2i_sampler_equals_generate(comfy, tiny_files, tmp_path):
    """Reference schedule, true CFG with norm rescale, a batch of 2 (seeds 5, 6 = --num_images 2)."""
    model, te, _, _, _ = models("original", tiny_files["repo"], comfy)
    out = run_sampler(model, encode(te, PROMPT), encode(te, NEGATIVE), empty_latent(64, 96, batch=2))
    assert out["samples"].shape == (2, 16, 1, 8, 12)
    ref = generate(tmp_path, "--model", tiny_files["repo"], "--prompt", PROMPT, "--negative_prompt", NEGATIVE,
                   "--image_size", 64, 96, "--seed", 5, "--num_images", 2, "--guidance_scale", 4)
    torch.testing.assert_close(normalised(out), ref, **LATENT_TOL)


def test_sampler_options_match_the_cli_flags(comfy, tiny_files, tmp_path):
    """A ComfyUI scheduler and sampler, plain CFG, guidance methods (one per line) and the options line."""
    model, te, _, _, _ = models("original", tiny_files["repo"], comfy)
    out = run_sampler(model, encode(te, PROMPT), encode(te, NEGATIVE), empty_latent(64, 64), sampler="dpmpp_2m",
                      scheduler="simple", cfg_mode="plain", cfg=3.0, guidance="cfg_norm:strength=1\n\n# comment\napg:eta=0.5",
                      options="--model_sampling aura_flow --shift 3.1")
    ref = generate(tmp_path, "--model", tiny_files["repo"], "--prompt", PROMPT, "--negative_prompt", NEGATIVE,
                   "--image_size", 64, 64, "--seed", 5, "--guidance_scale", 3, "--sampler", "dpmpp_2m", "--scheduler",
                   "simple", "--cfg_mode", "plain", "--guidance", "cfg_norm:strength=1", "--guidance", "apg:eta=0.5",
                   "--model_sampling", "aura_flow", "--shift", 3.1)
    torch.testing.assert_close(normalised(out), ref, **LATENT_TOL)


def test_img2img_denoise_is_strength(comfy, tiny_files, tmp_path):
    """denoise < 1 starts from the LATENT input (here VAE-encoded by the flowtuner VAE, as generate --image)."""
    model, te, vae, _, _ = models("original", tiny_files["repo"], comfy)
    source = tmp_path / "source.png"
    Image.fromarray((np.random.default_rng(0).random((64, 64, 3)) * 255).astype(np.uint8)).save(source)
    latent = {"samples": vae.encode(comfy_image(source))}
    out = run_sampler(model, encode(te, PROMPT), None, latent, cfg=1.0, steps=4, denoise=0.5, flow_shift=2.0)
    ref = generate(tmp_path / "gen", "--model", tiny_files["repo"], "--prompt", PROMPT, "--image", source, "--strength",
                   0.5, "--seed", 5, "--guidance_scale", 1, "--flow_shift", 2.0, steps=4)
    torch.testing.assert_close(normalised(out), ref, atol=2e-5, rtol=0)  # the source went raw -> normalised once more


@pytest.mark.parametrize("version,names", [("edit", "a"), ("edit-2511", "ab")])
def test_edit_sampler_equals_generate(comfy, small_area, edit_files, tmp_path, version, names):
    model, te, vae, _, _ = models(version, edit_files["repos"][version], comfy)
    images = [comfy_image(edit_files["images"][n]) for n in names]
    positive = encode(te, EDIT_PROMPT, version, vae, images)
    negative = encode(te, NEGATIVE, version, vae, images)  # diffusers' Edit pipelines read the images for both
    out = run_sampler(model, positive, negative, empty_latent(64, 96), seed=11)
    ref = generate(tmp_path, "--model", edit_files["repos"][version], "--prompt", EDIT_PROMPT, "--negative_prompt",
                   NEGATIVE, "--image_size", 64, 96, "--seed", 11, "--guidance_scale", 4, "--control_image_path",
                   *(edit_files["images"][n] for n in names))
    torch.testing.assert_close(normalised(out), ref, **LATENT_TOL)


def test_sampler_refuses_in_one_line(comfy, tiny_files, edit_files):
    model, te, _, _, _ = models("original", tiny_files["repo"], comfy)
    positive = encode(te, PROMPT)
    with pytest.raises(ConfigError, match="connect a negative conditioning"):
        run_sampler(model, positive, None, empty_latent(64, 64))
    with pytest.raises(ConfigError, match="--shift has its own widget|--sampler has its own widget"):
        run_sampler(model, positive, None, empty_latent(64, 64), cfg=1.0, options="--sampler euler")
    with pytest.raises(ConfigError, match="not a sampling option here"):
        run_sampler(model, positive, None, empty_latent(64, 64), cfg=1.0, options="--w 64")
    with pytest.raises(ConfigError, match="2 conditioning entries"):
        run_sampler(model, positive + positive, None, empty_latent(64, 64), cfg=1.0)
    with pytest.raises(ConfigError, match="multiples of 16"):
        run_sampler(model, positive, None, empty_latent(72, 64), cfg=1.0)
    with pytest.raises(ConfigError, match="--scheduler 'nope': unknown"):
        run_sampler(model, positive, None, empty_latent(64, 64), cfg=1.0, scheduler="nope")
    edit_model, edit_te, vae, _, _ = models("edit-2509", edit_files["repos"]["edit-2509"], comfy)
    with pytest.raises(ConfigError, match="carries reference latents"):
        run_sampler(model, encode(edit_te, EDIT_PROMPT, "edit-2509", vae, [torch.rand(1, 64, 64, 3)]), None,
                    empty_latent(64, 64), cfg=1.0)


# ------------------------------------------------------------------ ComfyUI's own Qwen model takes our CONDITIONING
def comfy_qwen_model(dit):
    """ComfyUI's comfy.model_base.QwenImage built at the tiny DiT's sizes, with its weights (ComfyUI's Qwen DiT
    uses diffusers' key names), wrapped in ComfyUI's ModelPatcher."""
    import comfy.model_patcher
    import comfy.supported_models

    cfg = dit.config
    unet_config = {"image_model": "qwen_image", "num_layers": cfg.num_layers, "attention_head_dim": cfg.attention_head_dim,
                   "num_attention_heads": cfg.num_attention_heads, "joint_attention_dim": cfg.joint_attention_dim,
                   "axes_dims_rope": tuple(cfg.axes_dims_rope), "in_channels": 64, "out_channels": 16, "patch_size": 2}
    model_config = comfy.supported_models.QwenImage(unet_config)
    model_config.set_inference_dtype(torch.float32, None)
    model = model_config.get_model({}, device=torch.device("cpu"))
    missing, unexpected = model.diffusion_model.load_state_dict(dit.state_dict(), strict=False)
    assert not unexpected and not [k for k in missing if "pe_embedder" not in k], (missing, unexpected)
    return comfy.model_patcher.ModelPatcher(model, torch.device("cpu"), torch.device("cpu"))


def comfy_ksampler(patcher, positive, negative, latent: torch.Tensor, steps=2, cfg=2.0) -> torch.Tensor:
    import comfy.sample

    noise = comfy.sample.prepare_noise(latent, 3)
    return comfy.sample.sample(patcher, noise, steps, cfg, "euler", "simple", positive, negative, latent, denoise=1.0,
                               seed=3, disable_pbar=True)


def test_comfyui_qwen_model_samples_with_our_conditioning(comfy, tiny_models, tiny_files, small_area, edit_files):
    """ComfyUI's KSampler path (comfy.sample.sample) on ComfyUI's QwenImage: text to image, and an edit prompt
    whose reference latents ComfyUI's model normalises and appends (they change the result)."""
    from tests.test_edit_dit import loud_dit

    _, te, _, _, _ = models("original", tiny_files["repo"], comfy)
    patcher = comfy_qwen_model(tiny_models["dit"])
    out = comfy_ksampler(patcher, encode(te, PROMPT), encode(te, NEGATIVE), torch.zeros(1, 16, 1, 8, 8))
    assert out.shape[0] == 1 and out.shape[1] == 16 and torch.isfinite(out).all()

    _, edit_te, vae, _, _ = models("edit-2509", edit_files["repos"]["edit-2509"], comfy)
    edit_patcher = comfy_qwen_model(loud_dit())
    image = [comfy_image(edit_files["images"]["a"])]
    with_refs = encode(edit_te, EDIT_PROMPT, "edit-2509", vae, image)
    without = encode(edit_te, EDIT_PROMPT, "edit-2509", None, image)
    a = comfy_ksampler(edit_patcher, with_refs, with_refs, torch.zeros(1, 16, 1, 8, 8), cfg=1.0)  # cfg 1: no negative pass
    b = comfy_ksampler(edit_patcher, without, without, torch.zeros(1, 16, 1, 8, 8), cfg=1.0)
    assert torch.isfinite(a).all() and (a - b).abs().max() > 1e-3


# ------------------------------------------------------------------ LoRA
@pytest.fixture(scope="module")
def trained_lora(tmp_path_factory, tiny_files):
    """A LoRA trained by flowtuner: 2 steps on the tiny model, a learning rate high enough to change the output."""
    root = tmp_path_factory.mktemp("comfy_lora")
    cfg = good_dataset(root, sizes=[(64, 64)] * 2)
    for kind in ("latents", "text"):
        assert main([f"cache-{kind}", "--dataset_config", str(cfg), "--model", str(tiny_files["repo"]), "--device", "cpu"]) == 0
    assert main(["train", "--dataset_config", str(cfg), "--model", str(tiny_files["repo"]), "--device", "cpu",
                 "--output_dir", str(root / "out"), "--seed", "3", "--max_data_loader_n_workers", "0",
                 "--max_train_steps", "2", "--learning_rate", "5e-2", "--network_dim", "4"]) == 0
    return root / "out" / "lora.safetensors"


def test_lora_node_changes_the_latents_as_generate_lora_weight(comfy, tiny_files, trained_lora, tmp_path):
    from flowtuner.comfyui.sampler import add_lora

    model, te, _, _, _ = models("original", tiny_files["repo"], comfy)
    positive, negative = encode(te, PROMPT), encode(te, NEGATIVE)
    base = normalised(run_sampler(model, positive, negative, empty_latent(64, 64)))
    with_lora = normalised(run_sampler(add_lora(model, str(trained_lora), 0.8), positive, negative, empty_latent(64, 64)))
    args = ("--model", tiny_files["repo"], "--prompt", PROMPT, "--negative_prompt", NEGATIVE, "--image_size", 64, 64,
            "--seed", 5, "--guidance_scale", 4)
    ref = generate(tmp_path, *args, "--lora_weight", trained_lora, "--lora_multiplier", 0.8)
    assert (with_lora - base).abs().max() > 1e-3  # the LoRA matters
    torch.testing.assert_close(with_lora, ref, **LATENT_TOL)
    again = normalised(run_sampler(model, positive, negative, empty_latent(64, 64)))
    assert torch.equal(again, base)  # the LoRA node left the loaded model as it was
    assert add_lora(model, str(trained_lora), 0.0) is model


def test_lora_node_refuses_a_non_lora_file(comfy, tiny_files):
    from flowtuner.comfyui.sampler import add_lora

    model, _, _, _, _ = models("original", tiny_files["repo"], comfy)
    bad = next((tiny_files["repo"] / "vae").glob("*.safetensors"))
    with pytest.raises(ConfigError) as info:
        add_lora(model, str(bad), 1.0)
    assert "\n" not in str(info.value)
