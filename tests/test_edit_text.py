"""Qwen-Image-Edit text encoding (prompt + control images through Qwen2.5-VL) against diffusers' Edit
pipelines, the vision tower loaded from every file layout, the per-version sizes against diffusers and
musubi-tuner, and bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from flowtuner.errors import ConfigError, WeightsError
from flowtuner.families.qwen_image import edit_sizes
from flowtuner.families.qwen_image.edit_text import QwenEditTextEncoder, prompt_text, text_recipe
from flowtuner.families.qwen_image.vision import infer_vision_config, load_vl_model, vision_view
from flowtuner.weights.reader import Checkpoint, TensorEntry
from tests.edit_models import edit_processor, tiny_vl
from tests.layouts import legacy_te_key, state

SIZES = [(160, 96), (128, 128), (96, 224)]
CPU = torch.device("cpu")


def image(width: int, height: int, seed: int) -> Image.Image:
    """Smooth colour ramps plus noise: a resize changes it, a misordered token shows."""
    rng = np.random.RandomState(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x / width, y / height, (x + y) / (width + height)], -1) * 160
    return Image.fromarray((base + rng.rand(height, width, 3) * 95).astype(np.uint8))


@pytest.fixture(scope="module")
def vl():
    """The tiny VL model whose forward also passes mm_token_type_ids (tests/edit_models.py): diffusers 0.42.1
    drops them on transformers 5.x; see test_diffusers_as_shipped_gives_image_tokens_1d_positions."""
    return tiny_vl()


@pytest.fixture(scope="module")
def processor(qwen_tokenizer):
    return edit_processor(qwen_tokenizer)


@pytest.fixture(scope="module")
def pipes(vl, processor, qwen_tokenizer, tiny_models):
    from diffusers import FlowMatchEulerDiscreteScheduler, QwenImageEditPipeline, QwenImageEditPlusPipeline

    parts = dict(scheduler=FlowMatchEulerDiscreteScheduler(), vae=tiny_models["vae"], text_encoder=vl,
                 tokenizer=qwen_tokenizer, processor=processor, transformer=tiny_models["dit"])
    return {"edit": QwenImageEditPipeline(**parts), "plus": QwenImageEditPlusPipeline(**parts)}


def reference(pipe, version: str, prompt: str, images: list[Image.Image]) -> torch.Tensor:
    """diffusers' encode_prompt on the control images resized as its __call__ resizes them."""
    resized = [pipe.image_processor.resize(im, *reversed(edit_sizes.vl_size(version, *im.size))) for im in images]
    with torch.no_grad():
        embeds, mask = pipe.encode_prompt(prompt, image=resized[0] if version == "edit" else resized, device=CPU)
    assert mask is None  # one prompt: all valid
    return embeds


@pytest.fixture(scope="module")
def encoders(vl, qwen_tokenizer):
    return {v: QwenEditTextEncoder(vl.model, qwen_tokenizer, v) for v in edit_sizes.EDIT_VERSIONS}


def test_v1_embeddings_equal_diffusers_for_each_aspect_ratio(encoders, pipes):
    images = [image(w, h, i) for i, (w, h) in enumerate(SIZES)]
    prompts = ["make the circle red", "remove the background", "turn it upside down, please"]
    ours = encoders["edit"].encode(prompts, [[im] for im in images])  # one batch: padding must not leak
    for prompt, im, cond in zip(prompts, images, ours):
        ref = reference(pipes["edit"], "edit", prompt, [im])
        assert cond.embeds.shape == ref.shape and cond.mask is None
        torch.testing.assert_close(cond.embeds, ref, atol=2e-5, rtol=0)
    w, h = edit_sizes.vl_size("edit", 160, 96)
    # smart_resize 800x1312 -> 812x1316: 29 x 47 vision tokens between vision_start/end, 4 prompt tokens, 5 suffix
    assert (w, h) == (1312, 800) and ours[0].embeds.shape[1] == 1 + 29 * 47 + 1 + 4 + 5


@pytest.mark.parametrize("count", [1, 2, 3])
def test_2509_embeddings_equal_diffusers_with_1_2_3_images(encoders, pipes, count):
    images = [image(w, h, 10 + i) for i, (w, h) in enumerate(SIZES[:count])]
    (cond,) = encoders["edit-2509"].encode(["put the hat on the dog"], [images])
    ref = reference(pipes["plus"], "edit-2509", "put the hat on the dog", images)
    assert cond.embeds.shape == ref.shape
    torch.testing.assert_close(cond.embeds, ref, atol=2e-5, rtol=0)
    # image order matters: the same images reversed give other embeddings
    if count > 1:
        (rev,) = encoders["edit-2509"].encode(["put the hat on the dog"], [images[::-1]])
        assert (rev.embeds[0, -10:] - cond.embeds[0, -10:]).abs().max() > 1e-2


def test_2511_encodes_like_2509_but_has_its_own_recipe(encoders):
    images = [image(128, 128, 3), image(96, 224, 4)]
    a = encoders["edit-2509"].encode(["x"], [images])[0].embeds
    b = encoders["edit-2511"].encode(["x"], [images])[0].embeds
    torch.testing.assert_close(a, b, atol=0, rtol=0)
    recipes = {text_recipe(v) for v in edit_sizes.EDIT_VERSIONS}
    assert len(recipes) == 3


def test_diffusers_as_shipped_gives_image_tokens_1d_positions(encoders, pipes, vl):
    """Documents a deviation: diffusers 0.42.1 on transformers 5.x passes no mm_token_type_ids, so image
    tokens get 1-D positions. flowtuner keeps the M-RoPE positions the model was trained with."""
    im = image(128, 128, 7)
    ours = encoders["edit-2509"].encode(["a"], [[im]])[0].embeds
    plain = super(type(vl), vl).forward  # the stock forward, as diffusers calls it
    pipe = pipes["plus"]
    resized = pipe.image_processor.resize(im, *reversed(edit_sizes.vl_size("edit-2509", 128, 128)))
    inputs = pipe.processor(text=[prompt_text("edit-2509", "a", 1)], images=[resized], padding=True, return_tensors="pt")
    with torch.no_grad():
        shipped = plain(input_ids=inputs.input_ids, attention_mask=inputs.attention_mask, pixel_values=inputs.pixel_values,
                        image_grid_thw=inputs.image_grid_thw, output_hidden_states=True).hidden_states[-1][:, 64:]
    assert shipped.shape == ours.shape
    assert (shipped - ours).abs().max() > 1e-2


def test_dropped_prefix_is_diffusers_64_for_both_templates(encoders):
    grids = torch.tensor([[1, 8, 8], [1, 4, 6]])
    for version, n in (("edit", 1), ("edit-2509", 2)):
        ids, cut = encoders[version].tokenize("make it blue", grids[:n])
        assert cut == 64
        assert ids.count(151655) == (16 if n == 1 else 16 + 6)  # <|image_pad|> expanded per image
        kept = encoders[version].tokenizer.decode(ids[cut:])
        start = "Picture 1: <|vision_start|>" if version == "edit-2509" else "<|vision_start|>"
        assert kept.startswith(start) and kept.endswith("make it blue<|im_end|>\n<|im_start|>assistant\n")


@pytest.fixture(scope="module")
def te_files(vl, tmp_path_factory):
    """The same weights as a transformers >= 4.52 folder, a legacy-key folder, a ComfyUI single file
    (legacy keys, no lm_head, no config) and a file with the language model only."""
    root = tmp_path_factory.mktemp("vl")
    vl.save_pretrained(root / "hf_new")
    legacy = {legacy_te_key(k): v for k, v in state(vl).items()}
    legacy = {k: v for k, v in legacy.items() if k is not None}
    (root / "hf_legacy").mkdir()
    save_file(legacy, root / "hf_legacy" / "model.safetensors")
    (root / "hf_legacy" / "config.json").write_text((root / "hf_new" / "config.json").read_text())
    (root / "comfy").mkdir()
    save_file(legacy, root / "comfy" / "qwen_2.5_vl_tiny.safetensors")
    save_file({k: v for k, v in legacy.items() if not k.startswith("visual.")}, root / "comfy" / "qwen_lm_only.safetensors")
    return root


def test_three_file_layouts_give_identical_embeddings(te_files, encoders, qwen_tokenizer):
    images = [image(96, 224, 21), image(160, 96, 22)]
    want = encoders["edit-2509"].encode(["swap them"], [images])[0].embeds
    for path in (te_files / "hf_new", te_files / "hf_legacy", te_files / "comfy" / "qwen_2.5_vl_tiny.safetensors"):
        model = load_vl_model(path)
        got = QwenEditTextEncoder(model, qwen_tokenizer, "edit-2509").encode(["swap them"], [images])[0].embeds
        torch.testing.assert_close(got, want, atol=0, rtol=0, msg=str(path))


def test_config_inferred_from_a_single_file_matches_the_model(te_files, vl):
    from flowtuner.weights.reader import open_checkpoint

    inferred = infer_vision_config(vision_view(open_checkpoint(te_files / "comfy" / "qwen_2.5_vl_tiny.safetensors")))
    real = vl.config.vision_config
    for key, value in inferred.items():
        if key not in ("initializer_range", "tokens_per_second"):
            assert getattr(real, key) == value, key


def test_text_encoder_without_vision_weights_is_one_clear_line(te_files):
    path = te_files / "comfy" / "qwen_lm_only.safetensors"
    with pytest.raises(WeightsError) as err:
        load_vl_model(path)
    msg = str(err.value)
    assert "\n" not in msg and str(path) in msg and "visual" in msg and "full Qwen2.5-VL" in msg


@pytest.mark.parametrize("version, counts", [("edit", (2,)), ("edit-2509", (4,)), ("edit-2511", (4,))])
def test_wrong_image_count_is_one_line(encoders, version, counts):
    for n in counts:
        with pytest.raises(ConfigError) as err:
            encoders[version].encode(["x"], [[image(32, 32, i) for i in range(n)]])
        assert "\n" not in str(err.value) and version in str(err.value) and f"got {n}" in str(err.value)
    from flowtuner.families.qwen_image.edit_family import QwenImageEditFamily

    with pytest.raises(ConfigError, match="got 0"):  # generation needs a control image; a training item may lack one
        QwenImageEditFamily(version).check_controls(0)


def test_a_prompt_without_images_is_encoded_as_text_to_image(encoders):
    """musubi-tuner trains edit-dataset items without control images with the text-to-image template."""
    from flowtuner.families.qwen_image.text_encoder import QwenTextEncoder

    enc = encoders["edit-2509"]
    mixed = enc.encode(["a red cat", "a blue dog"], [[], [image(32, 32, 0)]])
    plain = QwenTextEncoder(enc.model.language_model, enc.tokenizer).encode(["a red cat"])[0]
    with_image = enc.encode(["a blue dog"], [[image(32, 32, 0)]])[0]
    assert torch.equal(mixed[0].embeds, plain.embeds) and torch.equal(mixed[1].embeds, with_image.embeds)


def test_bad_prompt_and_list_mismatch_are_config_errors(encoders):
    with pytest.raises(ConfigError, match="one list per prompt"):
        encoders["edit"].encode(["a", "b"], [[image(32, 32, 0)]])
    with pytest.raises(ConfigError, match="vision tokens"):
        encoders["edit"].encode(["a <|image_pad|>"], [[image(32, 32, 0)]])
    with pytest.raises(ConfigError, match="not an edit model"):
        QwenEditTextEncoder(None, encoders["edit"].tokenizer, "original")


def _fake_checkpoint(shapes: dict[str, tuple[int, ...]]) -> Checkpoint:
    from pathlib import Path

    return Checkpoint(Path("qwen_2.5_vl_7b.safetensors"), {k: TensorEntry(Path("x"), torch.bfloat16, s, 0, 0) for k, s in shapes.items()})


def test_real_size_vision_tower_from_inferred_config_on_meta():
    """Qwen2.5-VL-7B's visual.* shapes -> the inferred config -> the real tower (meta device, no memory)."""
    from accelerate import init_empty_weights
    from transformers import Qwen2_5_VLConfig
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VisionTransformerPretrainedModel

    shapes = {"patch_embed.proj.weight": (1280, 3, 2, 14, 14), "merger.ln_q.weight": (1280,),
              "merger.mlp.0.weight": (5120, 5120), "merger.mlp.2.weight": (3584, 5120)}
    for i in range(32):
        shapes[f"blocks.{i}.mlp.gate_proj.weight"] = (3420, 1280)
    cfg = infer_vision_config(_fake_checkpoint(shapes))
    assert cfg["num_heads"] == 16 and cfg["fullatt_block_indexes"] == [7, 15, 23, 31] and cfg["window_size"] == 112
    assert cfg["spatial_merge_size"] == 2 and cfg["out_hidden_size"] == 3584
    vision = Qwen2_5_VLConfig(vision_config=cfg).vision_config
    with init_empty_weights():
        tower = Qwen2_5_VisionTransformerPretrainedModel(vision)
    params = sum(p.numel() for p in tower.parameters())
    assert params == 676_550_144  # reference §2.2/§2.4: "vision 0.68 B"


def test_sizes_equal_diffusers_calculate_dimensions():
    from diffusers.pipelines.qwenimage.pipeline_qwenimage_edit import calculate_dimensions as v1_dims
    from diffusers.pipelines.qwenimage.pipeline_qwenimage_edit_plus import CONDITION_IMAGE_SIZE, VAE_IMAGE_SIZE
    from diffusers.pipelines.qwenimage.pipeline_qwenimage_edit_plus import calculate_dimensions as plus_dims

    for w, h in SIZES + [(1920, 1080), (1024, 768), (1328, 1328), (333, 1000), (1, 7)]:
        assert edit_sizes.vl_size("edit", w, h) == v1_dims(1024 * 1024, w / h)[:2]
        assert edit_sizes.vae_size("edit", w, h) == v1_dims(1024 * 1024, w / h)[:2]
        assert edit_sizes.vl_size("edit-2509", w, h) == plus_dims(CONDITION_IMAGE_SIZE, w / h)
        assert edit_sizes.vae_size("edit-2511", w, h) == plus_dims(VAE_IMAGE_SIZE, w / h)
    assert edit_sizes.vae_size("edit", 1920, 1080) == (1376, 768)  # reference §7.2: diffusers rounds to 32
    # default output: the first image (v1) or the last (2509/2511), floored to 16
    assert edit_sizes.default_output_size("edit", [(160, 96), (96, 224)]) == (1312, 800)
    assert edit_sizes.default_output_size("edit-2509", [(160, 96), (96, 224)]) == (672, 1568)


def test_musubi_sizes_equal_musubi_bucket_selector(musubi):
    from musubi_tuner.dataset.bucket import BucketSelector

    for w, h in SIZES + [(1920, 1080), (1024, 768), (333, 1000), (4000, 3000)]:
        for reso in ((1024, 1024), (384, 384), (w, h)):
            assert edit_sizes.bucket_size(w, h, reso) == BucketSelector.calculate_bucket_resolution((w, h), reso, architecture="qie")
    assert edit_sizes.bucket_size(1920, 1080, (1024, 1024)) == (1360, 768)  # reference §7.2: musubi floors to 16
    vae, vl = edit_sizes.musubi_control_sizes(1920, 1080, (512, 512), official=True, to_image_size=True)
    assert vae == (1360, 768) and vl == BucketSelector.calculate_bucket_resolution((1920, 1080), (384, 384), architecture="qie")
    assert edit_sizes.musubi_control_sizes(1920, 1080, (512, 640), official=False, to_image_size=True) == ((512, 640), (512, 640))
    assert edit_sizes.musubi_control_sizes(1000, 999, (512, 640), official=False, to_image_size=False) == ((992, 992),) * 2


def test_vision_tower_of_unknown_width_asks_for_config_json():
    shapes = {"patch_embed.proj.weight": (32, 3, 2, 14, 14), "merger.mlp.0.weight": (128, 128),
              "merger.mlp.2.weight": (128, 128), "blocks.0.mlp.gate_proj.weight": (64, 32)}
    with pytest.raises(WeightsError, match="width 32 is not a Qwen2.5-VL size; put its config.json beside it"):
        infer_vision_config(_fake_checkpoint(shapes))


def test_the_repos_processor_config_sets_the_vision_pixel_limits(tmp_path):
    """A diffusers repo's processor/preprocessor_config.json is honoured (diffusers builds its processor from it);
    without one, the released models' limits apply."""
    import json

    from flowtuner.families.base import ModelPaths
    from flowtuner.families.qwen_image.edit_family import processor_config
    from flowtuner.families.qwen_image.edit_text import MAX_PIXELS, image_processor

    repo = tmp_path / "repo"
    (repo / "processor").mkdir(parents=True)
    (repo / "text_encoder").mkdir()
    assert processor_config(ModelPaths(text_encoder=repo / "text_encoder", model_root=repo)) is None
    (repo / "processor" / "preprocessor_config.json").write_text(json.dumps({"min_pixels": 3136, "max_pixels": 112 * 112}))
    found = processor_config(ModelPaths(text_encoder=repo / "text_encoder"))  # found from the text encoder's folder too
    assert found == {"min_pixels": 3136, "max_pixels": 12544}
    picture = image(384, 384, 0)
    small = image_processor(found)(picture, return_tensors="pt")["image_grid_thw"].prod().item()
    full = image_processor()(picture, return_tensors="pt")["image_grid_thw"].prod().item()
    assert small <= 12544 // 14**2 < full and image_processor().size.longest_edge == MAX_PIXELS
