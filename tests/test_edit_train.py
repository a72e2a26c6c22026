"""Qwen-Image-Edit training end to end through the CLI, for v1, 2509 and 2511: cache-latents + cache-text on a
dataset with a control_directory (items with one control, one with two, one with none), LoRA training and a full
fine-tune, training previews with `--ci` control images, a trained Edit-2509 LoRA loaded by diffusers'
QwenImageEditPlusPipeline (same latents as `flowtuner generate --lora_weight`), and bit-exact resume.

The model sets are tests/test_edit_generate.py's (`edit_files`: a diffusers repo per version, loud DiT)."""

from __future__ import annotations

import math
import time

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from flowtuner.cli import main
from flowtuner.families.qwen_image import edit_family
from flowtuner.train import loop
from tests.datasets import noise_image, write_config, write_item
from tests.test_edit_dit import control_image, small_area  # noqa: F401  (small_area: a fixture)
from tests.test_edit_generate import PROMPT, assert_close, edit_files, generate, reference  # noqa: F401  (edit_files: a fixture)

VERSIONS = ("edit", "edit-2509", "edit-2511")
# targets (48x48: 9 packed tokens each) -> their control images' stems; "two" has musubi's _0 / _1 suffixes
CONTROLS = {"a": ["a"], "b": ["b"], "c": ["c"], "d": ["d"], "two": ["two_0", "two_1"], "none": []}
SIZE = 48


def edit_dataset(root, cache="cache"):
    """Six 48x48 targets with captions, their controls (other sizes: the dataset sizes them to the target's
    bucket) in a control_directory; batch size 2."""
    images, controls = root / "images", root / "controls"
    if not images.exists():
        for i, (stem, stems) in enumerate(CONTROLS.items()):
            write_item(images, stem, noise_image(SIZE, SIZE, seed=i), f"make the {stem} picture red")
            for j, name in enumerate(stems):
                write_item(controls, name, control_image((64 - 16 * j, 40 + 8 * i), 10 * i + j), None)
    return write_config(root / f"{cache}.toml", f"""
[general]
resolution = [{SIZE}, {SIZE}]
caption_extension = ".txt"
batch_size = 2

[[datasets]]
image_directory = "{images}"
control_directory = "{controls}"
cache_directory = "{root / cache}"
""")


def cache(cfg, repo, version, capsys=None) -> list[str]:
    """cache-latents then cache-text; their summary lines when capsys is given."""
    out = []
    for kind in ("latents", "text"):
        assert main([f"cache-{kind}", "--dataset_config", str(cfg), "--model", str(repo), "--model_version", version,
                     "--device", "cpu"]) == 0
        if capsys is not None:
            out.append(capsys.readouterr().out)
    return out


def train(cfg, repo, version, out, *extra, command="train"):
    return main([command, "--dataset_config", str(cfg), "--model", str(repo), "--model_version", version, "--device", "cpu",
                 "--output_dir", str(out), "--seed", "3", "--max_data_loader_n_workers", "0", *map(str, extra)])


@pytest.fixture
def observed(monkeypatch):
    """Every training loss, and per DiT call (sequence length, target tokens, reference count)."""
    seen = {"loss": [], "dit": []}
    original_loss, original_load = loop.Trainer.loss, edit_family.QwenImageEditFamily.load_denoiser

    def loss(self, *a, **k):
        value, sigma = original_loss(self, *a, **k)
        seen["loss"].append(value.item())
        return value, sigma

    def hook(module, args, kwargs):
        shapes = kwargs["img_shapes"][0]
        seen["dit"].append((kwargs["hidden_states"].shape[1], math.prod(shapes[0]), len(shapes) - 1))

    def load_denoiser(self, *a, **k):
        denoiser = original_load(self, *a, **k)
        denoiser.dit.register_forward_pre_hook(hook, with_kwargs=True)
        return denoiser

    monkeypatch.setattr(loop.Trainer, "loss", loss)
    monkeypatch.setattr(edit_family.QwenImageEditFamily, "load_denoiser", load_denoiser)
    return seen


ARCHITECTURE = {"edit": ("Qwen-Image-Edit", None), "edit-2509": ("Qwen-Image-Edit-Plus", "CUSTOM_ARCH_QWEN_IMAGE_EDIT_PLUS"),
                "edit-2511": ("Qwen-Image-Edit-2511", "CUSTOM_ARCH_QWEN_IMAGE_EDIT_2511")}


def musubi_modelspec(version: str) -> dict:
    """The modelspec musubi-tuner writes for a LoRA of this version (qwen_image_train_network.py sets the
    custom architecture from --model_version)."""
    from musubi_tuner.dataset.architectures import ARCHITECTURE_QWEN_IMAGE_EDIT
    from musubi_tuner.utils import sai_model_spec

    custom = ARCHITECTURE[version][1]
    meta = sai_model_spec.build_metadata(None, ARCHITECTURE_QWEN_IMAGE_EDIT, time.time(),
                                         custom_arch=getattr(sai_model_spec, custom) if custom else None)
    return {k: meta[k] for k in ("modelspec.architecture", "modelspec.implementation", "modelspec.resolution")}


def musubi_base_model_version() -> str:
    """musubi-tuner's ss_base_model_version for an edit LoRA: its trainer's architecture_full_name."""
    from musubi_tuner.dataset.architectures import ARCHITECTURE_QWEN_IMAGE_EDIT_FULL

    return ARCHITECTURE_QWEN_IMAGE_EDIT_FULL


# ------------------------------------------------------------------ cache + LoRA training, every version
@pytest.mark.parametrize("version", [pytest.param("edit", marks=pytest.mark.slow), "edit-2509", "edit-2511"])
def test_cache_and_train_a_lora(tmp_path, musubi, small_area, edit_files, observed, version):
    """Caches with musubi's keys and suffix; a LoRA trained one epoch (4 steps, so every kind of batch is seen:
    1 control, 2 controls, none) with finite losses, the references in the DiT's input after the target tokens,
    and the file musubi-tuner would write for the version (kohya keys, modelspec, ss_base_model_version)."""
    cfg = edit_dataset(tmp_path)
    cache(cfg, edit_files["repos"][version], version)
    refs = 1 if version == "edit" else 2  # v1 takes the first of "two"'s controls
    with safe_open(str(tmp_path / "cache/two_0048x0048_qie.safetensors"), "pt") as f:
        assert sorted(f.keys()) == ["latents_1x6x6_bfloat16"] + [f"latents_control_{i}_1x6x6_bfloat16" for i in range(refs)]
    with safe_open(str(tmp_path / "cache/none_0048x0048_qie.safetensors"), "pt") as f:
        assert list(f.keys()) == ["latents_1x6x6_bfloat16"]
    assert sorted(p.name for p in (tmp_path / "cache").glob("a_*")) == ["a_0048x0048_qie.safetensors", "a_qie_te.safetensors"]

    # 4 batches per epoch, control counts never mixed: a-d (2) | two | none, v1: a-d + two (3) | none
    out = tmp_path / "run"
    assert train(cfg, edit_files["repos"][version], version, out, "--max_train_steps", 4, "--learning_rate", "1e-3") == 0
    assert len(observed["loss"]) == 4 and all(math.isfinite(v) and v > 0 for v in observed["loss"])
    # the references reached the DiT after the target tokens; "none" trained as text-to-image
    assert {(n - target, k) for n, target, k in observed["dit"]} == ({(0, 0), (9, 1)} | ({(18, 2)} if refs == 2 else set()))
    assert all(target == 9 for _, target, _ in observed["dit"])

    lora = out / "lora.safetensors"
    weights = load_file(lora)
    assert weights and all(k.startswith("lora_unet_transformer_blocks_") for k in weights)
    with safe_open(str(lora), "pt") as f:
        meta = f.metadata()
    assert {k: meta[k] for k in musubi_modelspec(version)} == musubi_modelspec(version)
    assert meta["modelspec.architecture"] == f"{ARCHITECTURE[version][0]}/lora"
    assert meta["ss_network_module"] == "networks.lora_qwen_image"
    assert meta["ss_base_model_version"] == musubi_base_model_version() == "qwen_image_edit"


@pytest.mark.slow
def test_switching_version_recomputes_the_text_caches(tmp_path, small_area, edit_files, capsys):
    """A v1 text cache is stale for 2509 (its own template; the images numbered); of the latent caches only the
    one whose control count changes ("two": v1 took its first control only)."""
    cfg = edit_dataset(tmp_path)
    cache(cfg, edit_files["repos"]["edit"], "edit", capsys)
    te = tmp_path / "cache/two_qie_te.safetensors"
    v1 = load_file(te)
    latents, text = cache(cfg, edit_files["repos"]["edit-2509"], "edit-2509", capsys)
    assert "1 cached, 5 fresh" in latents and "recomputed: 1 x control_sizes changed" in latents
    assert "6 cached, 0 fresh" in text and "recomputed: 6 x recipe changed" in text
    plus = load_file(te)
    assert v1.keys() == plus.keys() and any(v1[k].shape != plus[k].shape or not torch.equal(v1[k], plus[k]) for k in v1)
    latents, text = cache(cfg, edit_files["repos"]["edit-2509"], "edit-2509", capsys)
    assert "0 cached, 6 fresh" in latents and "0 cached, 6 fresh" in text


# ------------------------------------------------------------------ 2509: fine-tune, previews, diffusers, resume
@pytest.fixture(scope="module")
def plus(tmp_path_factory, edit_files):
    """The dataset cached for Edit-2509 (its VL image area is the real 384²; the VAE controls are the targets'
    48x48 bucket, so no area needs shrinking here)."""
    root = tmp_path_factory.mktemp("plus")
    cfg = edit_dataset(root)
    cache(cfg, edit_files["repos"]["edit-2509"], "edit-2509")
    return cfg, edit_files["repos"]["edit-2509"]


@pytest.mark.slow
def test_finetune_and_generate_with_the_result(tmp_path, musubi, small_area, plus, observed):
    """Two steps of full fine-tuning; the saved DiT has the base's keys, moved weights, musubi's modelspec
    architecture (no /lora), and runs in generate."""
    from musubi_tuner.dataset.architectures import ARCHITECTURE_QWEN_IMAGE_EDIT
    from musubi_tuner.utils import sai_model_spec

    cfg, repo = plus
    out = tmp_path / "ft"
    assert train(cfg, repo, "edit-2509", out, "--max_train_steps", 2, "--learning_rate", "1e-3",
                 "--optimizer_type", "adamw", "--save_precision", "fp32", command="finetune") == 0
    assert len(observed["loss"]) == 2 and all(math.isfinite(v) for v in observed["loss"])
    tuned = load_file(out / "lora.safetensors")
    base = {}
    for shard in (repo / "transformer").glob("*.safetensors"):
        base.update(load_file(shard))
    assert tuned.keys() == base.keys()
    moved = [k for k in base if not torch.equal(base[k].float(), tuned[k].float())]
    assert len(moved) > len(base) // 2
    with safe_open(str(out / "lora.safetensors"), "pt") as f:
        arch = f.metadata()["modelspec.architecture"]
    assert arch == sai_model_spec.build_metadata(None, ARCHITECTURE_QWEN_IMAGE_EDIT, time.time(), is_lora=False,
                                                 custom_arch=sai_model_spec.CUSTOM_ARCH_QWEN_IMAGE_EDIT_PLUS)["modelspec.architecture"]

    control = next((cfg.parent / "controls").glob("a.png"))
    common = ["--model", repo, "--model_version", "edit-2509", "--control_image_path", control, "--prompt", PROMPT,
              "--seed", 1, "--image_size", 48, 48]
    before = generate(tmp_path / "base", *common)
    after = generate(tmp_path / "tuned", *common, "--dit", out / "lora.safetensors")
    assert torch.isfinite(after).all() and (after - before).abs().max() > 1e-3


@pytest.mark.slow
def test_previews_with_control_images_are_what_generate_makes(tmp_path, small_area, plus):
    """A sample prompt line with two `--ci` images, --sample_at_first: the PNG is generate's image with the same
    control images (the LoRA starts at zero), and another control image gives another preview."""
    import numpy as np
    from PIL import Image

    cfg, repo = plus
    a, b, c = (cfg.parent / "controls" / f"{n}.png" for n in ("a", "two_0", "c"))
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(f"{PROMPT} --ci {a} --ci {b} --w 48 --h 48 --s 2 --d 9 --l 1\n"
                       f"{PROMPT} --ci {c} --ci {b} --w 48 --h 48 --s 2 --d 9 --l 1\n")
    out = tmp_path / "run"
    assert train(cfg, repo, "edit-2509", out, "--max_train_steps", 1, "--sample_prompts", prompts, "--sample_at_first") == 0
    samples = sorted((out / "sample").glob("*.png"))
    assert [p.name for p in samples] == ["lora_000000_00_9.png", "lora_000000_01_9.png"]
    gen = tmp_path / "gen"
    assert main(["generate", "--model", str(repo), "--control_image_path", str(a), str(b), "--prompt", PROMPT,
                 "--seed", "9", "--guidance_scale", "1", "--image_size", "48", "48", "--infer_steps", "2",
                 "--save_path", str(gen), "--device", "cpu"]) == 0
    first, second, made = (np.asarray(Image.open(p)).astype(int) for p in (*samples, next(gen.glob("*.png"))))
    assert first.shape == (48, 48, 3) and np.abs(first - made).max() <= 1
    assert np.abs(first - second).max() > 8  # the control images matter


@pytest.mark.slow
def test_trained_2509_lora_loads_in_diffusers_with_the_same_latents(tmp_path, small_area, plus, qwen_tokenizer):
    from diffusers import QwenImageEditPlusPipeline

    from tests.edit_models import edit_processor, with_image_positions

    cfg, repo = plus
    out = tmp_path / "run"
    assert train(cfg, repo, "edit-2509", out, "--max_train_steps", 4, "--learning_rate", "0.05", "--network_dim", 4,
                 "--network_alpha", 4) == 0
    lora = out / "lora.safetensors"
    assert any(v.abs().max() > 1e-3 for k, v in load_file(lora).items() if "lora_up" in k)
    pipe = QwenImageEditPlusPipeline.from_pretrained(
        repo, text_encoder=with_image_positions().from_pretrained(repo / "text_encoder").eval(),
        processor=edit_processor(qwen_tokenizer))
    images = [cfg.parent / "controls" / f"{n}.png" for n in ("two_0", "two_1")]
    base = reference(pipe, "edit-2509", images, PROMPT, 6, cfg=1.0, size=(48, 64), steps=2)
    pipe.load_lora_weights(str(lora))
    ref = reference(pipe, "edit-2509", images, PROMPT, 6, cfg=1.0, size=(48, 64), steps=2)
    assert (ref - base).abs().max() > 1e-2  # the trained LoRA matters
    ours = generate(tmp_path / "gen", "--model", repo, "--control_image_path", *images, "--prompt", PROMPT,
                    "--guidance_scale", 1, "--seed", 6, "--image_size", 48, 64, "--lora_weight", lora, steps=2)
    assert_close(ours, ref)


RESUME_ARGS = ("--max_train_steps", 4, "--learning_rate", "1e-3", "--network_dim", 2, "--network_dropout", 0.1,
               "--lr_scheduler", "cosine")


@pytest.mark.slow
def test_edit_lora_resume_is_bit_identical(tmp_path, plus):
    """4 steps == 2 steps, saved state, 2 more resumed, in the middle of an epoch of batches with 0, 1 and 2
    control images. Saving a state draws no random numbers (tests/test_train.py), so the run that saved it is
    the straight one."""
    cfg, repo = plus
    assert train(cfg, repo, "edit-2509", tmp_path / "first", *RESUME_ARGS, "--save_every_n_steps", 2, "--save_state") == 0
    state = tmp_path / "first" / "lora-step00000002-state"
    assert train(cfg, repo, "edit-2509", tmp_path / "resumed", *RESUME_ARGS, "--resume", state) == 0
    a, b = load_file(tmp_path / "first/lora.safetensors"), load_file(tmp_path / "resumed/lora.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any(a[k].abs().sum() > 0 for k in a if "lora_up" in k)  # it trained


@pytest.mark.slow
@pytest.mark.parametrize("version", ["edit", "edit-2511"])
def test_finetune_the_other_versions(tmp_path, musubi, small_area, edit_files, observed, version):
    """Two steps of full fine-tuning for v1 and 2511 too (2509: above): finite losses, the references reach the DiT,
    more than half the weights move, and the file carries musubi-tuner's modelspec architecture for a full model."""
    from musubi_tuner.dataset.architectures import ARCHITECTURE_QWEN_IMAGE_EDIT
    from musubi_tuner.utils import sai_model_spec

    repo = edit_files["repos"][version]
    cfg = edit_dataset(tmp_path / "data")
    cache(cfg, repo, version)
    out = tmp_path / "ft"
    assert train(cfg, repo, version, out, "--max_train_steps", 2, "--learning_rate", "1e-3", "--optimizer_type", "adamw",
                 "--save_precision", "fp32", command="finetune") == 0
    assert len(observed["loss"]) == 2 and all(math.isfinite(v) for v in observed["loss"])
    assert any(refs > 0 for _, _, refs in observed["dit"])
    tuned, base = load_file(out / "lora.safetensors"), {}
    for shard in (repo / "transformer").glob("*.safetensors"):
        base.update(load_file(shard))
    assert tuned.keys() == base.keys()
    assert sum(not torch.equal(base[k].float(), tuned[k].float()) for k in base) > len(base) // 2
    custom = ARCHITECTURE[version][1]
    expected = sai_model_spec.build_metadata(None, ARCHITECTURE_QWEN_IMAGE_EDIT, time.time(), is_lora=False,
                                             custom_arch=getattr(sai_model_spec, custom) if custom else None)
    with safe_open(str(out / "lora.safetensors"), "pt") as f:
        assert f.metadata()["modelspec.architecture"] == expected["modelspec.architecture"]
